"""Real architectures (timm ViT / Mixer, HF BERT / RoBERTa / GPT-2, VGG-style classifiers).

Every model is a tiny randomly initialised config built in code: nothing is downloaded. Weights
are re-drawn with a spread that puts pre-activations at O(1) (HF draws them at std 0.02, where
every activation is nearly linear), so the nonlinearity is exercised.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.integrations.common import LIBRARY_ACTIVATIONS, collapsible_act
from lc_kernels.nn.activation import CollapsibleActivation

from conftest import rel_err

timm = pytest.importorskip("timm", reason="timm not installed: pip install timm (with a matching torchvision)")
transformers = pytest.importorskip("transformers", reason="transformers not installed: pip install transformers")

from timm.layers import GluMlp, Mlp  # noqa: E402
from timm.layers.activations import QuickGELU  # noqa: E402
from timm.models.mlp_mixer import MlpMixer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel, RobertaConfig, RobertaModel)
from transformers import activations as hf_act  # noqa: E402

CONVERT_TOL = 1e-6  # converting at alpha = 0 (float32)
COLLAPSE_TOL = 1e-5  # collapse at alpha = 1 vs the uncollapsed model (float32)


pytestmark = pytest.mark.usefixtures("one_thread")


def spread(model: nn.Module, gain: float = 1.5) -> nn.Module:
    """Redraw every Linear / Conv1D weight and bias at O(1) scale (HF initialises at std 0.02)."""
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, nn.Parameter) and w.dim() == 2 and not isinstance(m, nn.Embedding):
                fan_in = w.shape[1] if isinstance(m, nn.Linear) else w.shape[0]
                w.normal_(0, gain / fan_in ** 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.5)
    return model


def vit(**kw) -> nn.Module:
    return VisionTransformer(img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                             mlp_ratio=2.0, **kw)


def mixer() -> nn.Module:
    return MlpMixer(num_classes=10, img_size=16, patch_size=4, num_blocks=2, embed_dim=32)


def bert_config(**kw) -> dict:
    return dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=16, **kw)


def gpt2_config(**kw) -> GPT2Config:
    return GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                      eos_token_id=0, **kw)


class VGGLike(nn.Module):
    """torchvision's VGG layout (features, avgpool, classifier) at toy width."""

    def __init__(self, batchnorm: bool):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        bn = (lambda n: [nn.BatchNorm1d(n)]) if batchnorm else (lambda n: [])
        self.classifier = nn.Sequential(
            nn.Linear(32, 48), *bn(48), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(48, 48), *bn(48), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(48, 10))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm1d):  # non-trivial running statistics to fold
                    m.running_mean.normal_(0, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.normal_(1, 0.2)
                    m.bias.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def hf_out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# name -> (builder, input maker, forward, expected sites)
MODELS = {
    "timm_vit": (lambda: vit(), lambda: torch.randn(3, 3, 16, 16), lambda m, x: m(x),
                 ["blocks.0.mlp", "blocks.1.mlp"]),
    "timm_vit_proj_drop": (lambda: vit(proj_drop_rate=0.1), lambda: torch.randn(3, 3, 16, 16), lambda m, x: m(x),
                           ["blocks.0.mlp.0", "blocks.1.mlp.0"]),
    # Mixer's head is zero-initialised: compare the features.
    "timm_mixer": (mixer, lambda: torch.randn(3, 3, 16, 16), lambda m, x: m.forward_features(x),
                   ["blocks.0.mlp_tokens", "blocks.0.mlp_channels", "blocks.1.mlp_tokens", "blocks.1.mlp_channels"]),
    "bert": (lambda: BertModel(BertConfig(**bert_config())), lambda: torch.randint(3, 50, (2, 9)), hf_out,
             ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]),
    "bert_cls": (lambda: BertForSequenceClassification(BertConfig(**bert_config(num_labels=3))),
                 lambda: torch.randint(3, 50, (2, 9)), hf_out,
                 ["bert.encoder.layer.0.intermediate", "bert.encoder.layer.1.intermediate"]),
    "roberta_gelu_new": (lambda: RobertaModel(RobertaConfig(**{**bert_config(hidden_act="gelu_new"),
                                                               "max_position_embeddings": 20})),
                         lambda: torch.randint(3, 50, (2, 9)), hf_out,
                         ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]),
    "gpt2_lm": (lambda: GPT2LMHeadModel(gpt2_config()), lambda: torch.randint(0, 50, (2, 9)), hf_out,
                ["transformer.h.0.mlp.0", "transformer.h.1.mlp.0"]),
    "gpt2_no_dropout": (lambda: GPT2LMHeadModel(gpt2_config(resid_pdrop=0.0)), lambda: torch.randint(0, 50, (2, 9)),
                        hf_out, ["transformer.h.0.mlp", "transformer.h.1.mlp"]),
    "vgg": (lambda: VGGLike(False), lambda: torch.randn(4, 3, 8, 8), lambda m, x: m(x), ["classifier.0"]),
    "vgg_bn": (lambda: VGGLike(True), lambda: torch.randn(4, 3, 8, 8), lambda m, x: m(x), ["classifier.0"]),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return spread(MODELS[name][0]()).eval()


def set_alphas(model: nn.Module, value: float | None) -> None:
    """Set every slope to ``value``, or (None) draw them in [0, 1]."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CollapsibleActivation):
                m.alpha.copy_(torch.rand_like(m.alpha) if value is None else torch.full_like(m.alpha, value))


@pytest.mark.parametrize("name", MODELS)
def test_prepare_keeps_outputs(name):
    _, make_x, fwd, sites = MODELS[name]
    model = build(name)
    x = make_x()
    with torch.no_grad():
        ref = fwd(model, x)
        got_sites = lc.prepare_(model)
        out = fwd(model, x)
    assert list(got_sites) == sites
    assert got_sites.skipped == []
    assert rel_err(out, ref) <= CONVERT_TOL


@pytest.mark.parametrize("name", MODELS)
def test_collapse_at_alpha_one_matches_uncollapsed(name):
    _, make_x, fwd, sites = MODELS[name]
    model = build(name)
    lc.prepare_(model)
    set_alphas(model, 1.0)
    x = make_x()
    with torch.no_grad():
        ref = fwd(model, x)
        plan = lc.collapse_(model, tol=0.0)
        out = fwd(model, x)
    assert [s.path for s in plan.sites] == sites and all(s.changes for s in plan.sites)
    assert not any(isinstance(m, CollapsibleActivation) for m in model.modules())
    assert rel_err(out, ref) <= COLLAPSE_TOL


@pytest.mark.parametrize("name", MODELS)
def test_save_load_onto_fresh_model(name, tmp_path):
    builder, make_x, fwd, _ = MODELS[name]
    model = build(name)
    lc.prepare_(model)
    set_alphas(model, None)
    acts = [m for m in model.modules() if isinstance(m, CollapsibleActivation)]
    with torch.no_grad():  # every other joint collapses exactly, the rest stay nonlinear
        for m in acts[::2]:
            m.alpha.fill_(1.0)
    lc.collapse_(model, tol=0.0)
    lc.save_collapsed(model, tmp_path)
    torch.manual_seed(1)
    fresh = builder().eval()  # different random weights: everything must come from the file
    lc.load_collapsed(fresh, tmp_path)
    x = make_x()
    with torch.no_grad():
        assert torch.equal(fwd(fresh, x), fwd(model, x))


def test_timm_state_dict_keeps_names():
    """A timm checkpoint loads into the prepared model; only the slopes are new."""
    model = build("timm_vit")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lc.prepare_(model)
    missing, unexpected = model.load_state_dict(original, strict=False)
    assert sorted(missing) == ["blocks.0.mlp.act.alpha", "blocks.1.mlp.act.alpha"] and unexpected == []


@pytest.mark.parametrize("name", ["timm_vit_proj_drop", "bert", "gpt2_lm"])
def test_training_mode_dropout_preserved(name):
    """Same seed, same dropout masks: the dropout after fc2 (or in BertOutput) is still applied."""
    _, make_x, fwd, _ = MODELS[name]
    model = build(name).train()
    x = make_x()
    with torch.no_grad():
        torch.manual_seed(3)
        ref = fwd(model, x)
        torch.manual_seed(4)
        other = fwd(model, x)
        lc.prepare_(model)
        torch.manual_seed(3)
        out = fwd(model, x)
    assert rel_err(other, ref) > 1e-2  # dropout is active in this config
    assert rel_err(out, ref) <= CONVERT_TOL


def test_bert_residual_and_layernorm_untouched():
    model = build("bert")
    layer = model.encoder.layer[0]
    norm, drop = layer.output.LayerNorm, layer.output.dropout
    lc.prepare_(model)
    assert isinstance(layer.intermediate, lc.LCFusedMLP)
    assert (layer.intermediate.in_features, layer.intermediate.out_features) == (32, 32)
    assert isinstance(layer.output.dense, nn.Identity)
    assert layer.output.LayerNorm is norm and layer.output.dropout is drop
    set_alphas(model, 1.0)
    lc.collapse_(model, tol=0.0)
    assert layer.intermediate.form == "merged" and layer.intermediate.fc.weight.shape == (32, 32)


def test_gpt2_conv1d_becomes_transposed_linear():
    model = build("gpt2_no_dropout")
    conv = model.transformer.h[0].mlp.c_fc
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    lc.prepare_(model)
    fc1 = model.transformer.h[0].mlp.fc1
    assert isinstance(fc1, nn.Linear) and torch.equal(fc1.weight, w.t()) and torch.equal(fc1.bias, b)
    assert fc1.weight.is_contiguous()


def test_filter_fn_selects_sites():
    model = build("bert")
    got = lc.prepare_(model, filter_fn=lambda m, path: path.startswith("encoder.layer.1."))
    assert list(got) == ["encoder.layer.1.intermediate"]
    assert ("encoder.layer.0.intermediate", "excluded by filter_fn") in got.skipped
    assert isinstance(model.encoder.layer[0].output.dense, nn.Linear)  # the excluded layer is left whole


def test_prepare_twice_converts_nothing_new():
    model = build("bert")
    lc.prepare_(model)
    again = lc.prepare_(model)
    assert list(again) == [] and again.skipped == []


def test_per_channel_alpha_round_trip(tmp_path):
    model = build("timm_vit")
    lc.prepare_(model, per_channel=True)
    assert model.blocks[0].mlp.act.num_parameters == 64
    lc.save_collapsed(model, tmp_path)
    fresh = vit().eval()
    lc.load_collapsed(fresh, tmp_path)
    assert fresh.blocks[0].mlp.act.num_parameters == 64


@pytest.mark.parametrize("make, reason", [
    (lambda: Mlp(8, 16, norm_layer=nn.LayerNorm), "LayerNorm between fc1 and fc2"),
    (lambda: Mlp(8, 16, use_conv=True), "use_conv=True"),
    (lambda: Mlp(8, 16, act_layer=QuickGELU), "QuickGELU has no exact collapsible form"),
    (lambda: GluMlp(8, 16), "gated MLP (GluMlp)"),
])
def test_timm_unsupported_blocks_are_skipped_with_reason(make, reason):
    model = nn.ModuleDict({"mlp": make()})
    got = lc.prepare_(model)
    assert list(got) == []
    assert len(got.skipped) == 1 and got.skipped[0][0] == "mlp" and reason in got.skipped[0][1]
    assert type(model["mlp"]) in (Mlp, GluMlp)


def test_timm_mlp_as_the_root_is_skipped_with_reason():
    got = lc.prepare_(Mlp(8, 16))
    assert list(got) == [] and "cannot be replaced in place" in got.skipped[0][1]


@pytest.mark.parametrize("act", ["quick_gelu", "relu6", "mish"])
def test_hf_unsupported_activation_is_skipped(act):
    model = build_hf_bert(hidden_act=act)
    got = lc.prepare_(model)
    assert list(got) == []
    assert [p for p, _ in got.skipped] == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    assert "no exact collapsible form" in got.skipped[0][1]
    assert isinstance(model.encoder.layer[0].output.dense, nn.Linear)


def build_hf_bert(**kw) -> nn.Module:
    torch.manual_seed(0)
    return BertModel(BertConfig(**bert_config(**kw))).eval()


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate",
                                 "gelu_python", "silu", "swish", "relu"])
def test_hf_activation_names_convert_exactly(act):
    model = spread(build_hf_bert(hidden_act=act))
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        ref = hf_out(model, ids)
        assert len(lc.prepare_(model)) == 2
        assert rel_err(hf_out(model, ids), ref) <= CONVERT_TOL


def _library_activation_classes():
    timm_acts = sys.modules["timm.layers.activations"]
    for (mod, name), base in LIBRARY_ACTIVATIONS.items():
        lib = hf_act if mod == "transformers.activations" else timm_acts
        if hasattr(lib, name):
            yield pytest.param(getattr(lib, name), base, id=name)


@pytest.mark.parametrize("cls, base", list(_library_activation_classes()))
def test_library_activation_table_is_exact(cls, base):
    act = cls()
    assert collapsible_act(act) == base
    x = torch.randn(4096) * 3
    assert rel_err(CollapsibleActivation(base)(x), act(x)) <= CONVERT_TOL
    # Not vacuous: the other GELU form is 1e-4 away on this range, 100x the tolerance.
    other = {"gelu": "gelu_tanh", "gelu_tanh": "gelu", "silu": "gelu", "relu": "silu"}[base]
    assert rel_err(CollapsibleActivation(other)(x), act(x)) > 30 * CONVERT_TOL


def test_callable_hidden_act_maps_and_unknown_raises():
    assert collapsible_act(torch.nn.functional.gelu) == "gelu"
    with pytest.raises(TypeError, match="no exact collapsible form"):
        collapsible_act(torch.tanh)


def test_prepare_on_plain_model_does_not_import_libraries():
    code = ("import sys, torch, lc_kernels as lc\n"
            "lc.prepare_(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)))\n"
            "assert 'transformers' not in sys.modules and 'timm' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('timm', 'transformers'))]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
