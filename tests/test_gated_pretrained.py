"""save_pretrained / load_pretrained on compressed Hugging Face models, strip_ and ONNX for LCGatedMLP."""
import copy
import functools
import json
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lc_kernels as lc
from conftest import error_without_lc_kernels, strip_and_compare
from lc_kernels.testing import rel_err

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
KINDS = ["llama", "qwen2", "gpt2"]


def dense(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CFG)).eval()
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def calib(seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 97, (4, 16), generator=g)} for _ in range(3)]


def state_bytes(model: nn.Module) -> int:
    seen = {}
    for v in model.state_dict().values():
        seen[(v.data_ptr(), v.shape)] = v.numel() * v.element_size()
    return sum(seen.values())


def become_partial(site: lc.LCGatedMLP, kept: int, rank: int | None, seed: int) -> None:
    """Install a PARTIAL form (random weights) at ``site``, whatever the planner chose there."""
    spec = dict(site.spec(), form="partial", kept=kept, rank=rank, packed=True, act="silu", num_alphas=1)
    new = lc.LCGatedMLP.empty(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    site.become(new)


@functools.cache
def _compressed(kind: str) -> tuple[nn.Module, int]:
    model = dense(kind)
    nbytes = state_bytes(model)
    lc.prepare_(model)
    plan = lc.plan_collapse(model, calib=calib(), target=0.5)
    if kind == "gpt2":
        lc.collapse_(model, plan, calib=calib())  # the classic path: refitted on the same calib
    else:
        assert all(sp.kind == "LCGatedMLP" for sp in plan.sites)
        lc.collapse_(model, plan)  # the gated path: the plan carries its fits
    assert any(sp.changes for sp in plan.sites), plan
    if kind == "llama":
        # Every gated form the planner can make, whatever it chose on this tiny model: layer 0 PARTIAL,
        # a site it kept PARTIAL with a low-rank skip, the rest as planned (LINEAR or PARTIAL).
        for i, layer in enumerate(model.model.layers):
            if i == 0 or layer.mlp.form == "gated":
                become_partial(layer.mlp, kept=16, rank=None if i == 0 else 8, seed=i)
    return model, nbytes


def compressed(kind: str) -> tuple[nn.Module, int]:
    model, nbytes = _compressed(kind)
    return copy.deepcopy(model), nbytes


def ids(seed: int = 2, batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def greedy(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                              use_cache=True, pad_token_id=0)


def site_forms(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {p: (type(m).__name__, getattr(m, "form", "chain")) for p, m in model.named_modules()
            if isinstance(m, (lc.LCGatedMLP, lc.LCFusedMLP, lc.LCChain))}


# -- round trip --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_computes_what_was_saved(kind, tmp_path):
    model, dense_bytes = compressed(kind)
    lc.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    # The file holds the compressed weights only: smaller than the dense model, no dense FFN tensor in it.
    assert os.path.getsize(tmp_path / "model.safetensors") < dense_bytes
    saved = safetensors_torch.load_file(tmp_path / "model.safetensors")
    changed = [p.partition(".mlp")[0] + ".mlp." for p, (_, form) in site_forms(model).items()
               if form not in ("gated", "mlp")]  # GPT-2's site is mlp.0, its dense weights mlp.c_fc/c_proj
    dense_ffn = {k: v.shape for k, v in dense(kind).state_dict().items() if any(k.startswith(p) for p in changed)}
    assert dense_ffn and not any(k in saved and saved[k].shape == shape for k, shape in dense_ffn.items())

    loaded = lc.load_pretrained(tmp_path)  # the directory alone: no dense model, no calibration data
    assert type(loaded) is type(model) and not loaded.training
    assert site_forms(loaded) == site_forms(model) and any(f != "gated" and f != "mlp"
                                                            for _, f in site_forms(loaded).values())
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    x = ids()
    want = logits(model, x)
    assert rel_err(logits(loaded, x), want) <= 1e-6
    assert torch.equal(greedy(loaded, x), greedy(model, x))

    cfg = json.loads((tmp_path / "config.json").read_text())
    entry = cfg["lc_kernels"]
    assert cfg["architectures"] == [type(model).__name__] and entry["version"] == lc.__version__
    assert set(entry["sites"]) == set(site_forms(model))
    for path, d in entry["sites"].items():
        assert d["form"] == site_forms(model)[path][1]
        if d["kind"] == "LCGatedMLP":
            assert d["spec"] == model.get_submodule(path).spec()

    # Saved again from the reloaded model: the same directory contents compute the same function.
    again = tmp_path / "again"
    lc.save_pretrained(loaded, again)
    assert rel_err(logits(lc.load_pretrained(again), x), want) <= 1e-6


class _Allocations(TorchDispatchMode):
    """The shapes of every tensor with storage that an op produces (meta tensors have none)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes |= {tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and not t.is_meta}
        return out


def test_loading_gated_sites_allocates_no_dense_ffn_weight(tmp_path):
    model, _ = compressed("llama")
    assert "gated" not in {f for _, f in site_forms(model).values()}
    lc.save_pretrained(model, tmp_path)
    d, h = CFG["hidden_size"], CFG["intermediate_size"]
    with _Allocations() as seen:
        loaded = lc.load_pretrained(tmp_path)
    assert seen.shapes and not seen.shapes & {(h, d), (d, h), (2 * h, d)}, sorted(seen.shapes)
    assert rel_err(logits(loaded, ids()), logits(model, ids())) <= 1e-6


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    model, _ = compressed("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    lc.save_pretrained(model, tmp_path)
    keys = set(safetensors_torch.load_file(tmp_path / "model.safetensors"))
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    entry = json.loads((tmp_path / "config.json").read_text())["lc_kernels"]
    assert entry["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = lc.load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_keep_everywhere_generates_exactly_like_the_dense_model(tmp_path):
    ref = dense("llama")
    model = copy.deepcopy(ref)
    assert len(lc.prepare_(model)) == CFG["num_hidden_layers"]  # every site KEEP, alpha 0
    lc.save_pretrained(model, tmp_path)
    loaded = lc.load_pretrained(tmp_path)
    assert {f for _, f in site_forms(loaded).values()} == {"gated"}
    x = ids(seed=5)
    want = greedy(ref, x)
    assert torch.equal(greedy(model, x), want)
    assert torch.equal(greedy(loaded, x), want)
    assert rel_err(logits(loaded, x), logits(ref, x)) <= 1e-6


def test_bfloat16_round_trip_is_exact_and_dtype_casts(tmp_path):
    model, _ = compressed("qwen2")
    model.to(torch.bfloat16)
    lc.save_pretrained(model, tmp_path)
    loaded = lc.load_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    # Rotary inv_freq is not in a dense checkpoint; it is saved with the dtype the model held it in.
    assert loaded.model.rotary_emb.inv_freq.dtype == model.model.rotary_emb.inv_freq.dtype
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))
    wide = lc.load_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    assert rel_err(logits(wide, x).float(), logits(model, x).float()) <= 3e-2


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model, _ = compressed("llama")
    lc.save_pretrained(model, path)
    return path


def _copy_dir(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_tensors(path, fn):
    tensors = safetensors_torch.load_file(path / "model.safetensors")
    fn(tensors)
    safetensors_torch.save_file(tensors, path / "model.safetensors")


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


# The fixture's layer 0 is PARTIAL (packed gate_up_proj, no low-rank skip).
def _nan(t):
    t["model.layers.0.mlp.skip.weight"][0, 0] = float("nan")


def _drop(t):
    del t["model.layers.0.mlp.down_proj.bias"]


def _extra(t):
    t["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(56, 32)


def _form(cfg):
    cfg["lc_kernels"]["sites"]["model.layers.0.mlp"]["form"] = "linear"


def _spec_form(cfg):
    site = cfg["lc_kernels"]["sites"]["model.layers.0.mlp"]
    site["form"] = site["spec"]["form"] = "linear"


def _widths(cfg):
    cfg["lc_kernels"]["sites"]["model.layers.0.mlp"]["spec"]["kept"] = 24


def _version(cfg):
    cfg["lc_kernels"]["format"] = "lc_kernels.pretrained/99"


def _no_entry(cfg):
    del cfg["lc_kernels"]


def _site_path(cfg):
    sites = cfg["lc_kernels"]["sites"]
    sites["model.layers.7.mlp"] = sites.pop("model.layers.0.mlp")


CORRUPTIONS = [
    ("tensors", _nan, r"model\.safetensors.*model\.layers\.0\.mlp\.skip\.weight.*NaN or Inf"),
    ("tensors", _drop, r"model\.safetensors.*missing model\.layers\.0\.mlp\.down_proj\.bias"),
    ("tensors", _extra, r"model\.safetensors.*unexpected model\.layers\.0\.mlp\.gate_proj\.weight"),
    ("config", _form, r"config\.json.*'model\.layers\.0\.mlp'.*form 'linear'.*builds form 'partial'"),
    ("config", _spec_form, r"model\.safetensors.*(missing|unexpected) model\.layers\.0\.mlp\."),
    ("config", _widths, r"model\.safetensors.*model\.layers\.0\.mlp\.gate_up_proj\.weight has shape"),
    ("config", _version, r"config\.json.*format 'lc_kernels\.pretrained/99'.*reads"),
    ("config", _no_entry, r"config\.json.*no \"lc_kernels\" entry"),
    ("config", _site_path, r"config\.json.*'model\.layers\.7\.mlp' is not a module"),
]


@pytest.mark.parametrize("what, edit, message", CORRUPTIONS, ids=[c[1].__name__.strip("_") for c in CORRUPTIONS])
def test_corrupt_checkpoint_is_refused_with_the_file_and_the_reason(saved_llama, tmp_path, what, edit, message):
    path = _copy_dir(saved_llama, tmp_path / "ckpt")
    (_edit_tensors if what == "tensors" else _edit_config)(path, edit)
    with pytest.raises(ValueError, match=message):
        lc.load_pretrained(path)


def test_edited_classic_site_is_refused(tmp_path):
    model, _ = compressed("gpt2")
    lc.save_pretrained(model, tmp_path)
    site = next(iter(json.loads((tmp_path / "config.json").read_text())["lc_kernels"]["sites"]))

    def merged(cfg):
        cfg["lc_kernels"]["sites"][site]["form"] = "merged"

    _edit_config(tmp_path, merged)
    with pytest.raises(ValueError, match=rf"config\.json.*'{site}' is recorded as LCFusedMLP\(form='merged'\)"):
        lc.load_pretrained(tmp_path)

    def no_plans(cfg):
        cfg["lc_kernels"]["sites"][site]["form"] = "partial"
        cfg["lc_kernels"]["plans"] = []

    _edit_config(tmp_path, no_plans)
    with pytest.raises(ValueError, match=rf"'{site}' is recorded as LCFusedMLP\(form='partial'\).*'mlp'"):
        lc.load_pretrained(tmp_path)


def test_missing_and_unreadable_files_are_refused(saved_llama, tmp_path):
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        lc.load_pretrained(tmp_path)
    path = _copy_dir(saved_llama, tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt"):
        lc.load_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is corrupt"):
        lc.load_pretrained(path)


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    with pytest.raises(TypeError, match="Hugging Face-style model"):
        lc.save_pretrained(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), tmp_path)
    model, _ = compressed("llama")
    lc.strip_(model)  # plain torch modules where the config would record LCGatedMLP sites: not rebuildable
    with pytest.raises(ValueError, match="does not match the model its config describes"):
        lc.save_pretrained(model, tmp_path / "stripped")
    assert not (tmp_path / "stripped").exists()


# -- strip_ and ONNX ---------------------------------------------------------------------------------------------

BASE = dict(form="gated", in_features=24, hidden_features=40, out_features=24, kept=40, rank=None, act="silu",
            num_alphas=1, packed=False, bias=False)
GATED_FORMS = {
    "gated": BASE,
    "gated_packed_alpha": dict(BASE, packed=True, bias=True, act="gelu_tanh"),
    "gated_per_channel": dict(BASE, num_alphas=40),
    "partial": dict(BASE, form="partial", kept=16, packed=True),
    "partial_low_rank": dict(BASE, form="partial", kept=8, rank=6, packed=True),
    "linear": dict(BASE, form="linear", kept=0, act=None, num_alphas=0, bias=True),
    "linear_low_rank": dict(BASE, form="linear", kept=0, rank=5, act=None, num_alphas=0, bias=True),
}


def gated_module(name: str, seed: int = 0) -> lc.LCGatedMLP:
    g = torch.Generator().manual_seed(seed)
    m = lc.LCGatedMLP.empty(GATED_FORMS[name])
    with torch.no_grad():
        for p in m.parameters():  # random slopes too: the interpolated activation, not only alpha 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if name == "gated":
            m.act.alpha.zero_()
    assert m.form == GATED_FORMS[name]["form"]
    return m.eval()


def gated_stack() -> nn.Sequential:
    """One tiny model holding an LCGatedMLP of every form."""
    torch.manual_seed(0)
    mods = [gated_module(n, i) for i, n in enumerate(GATED_FORMS)]
    return nn.Sequential(nn.Linear(12, 24), *mods, nn.Linear(24, 8)).eval()


@pytest.mark.parametrize("name", list(GATED_FORMS))
def test_strip_gated_keeps_outputs(name):
    model = nn.Sequential(nn.Linear(12, 24), gated_module(name), nn.Linear(24, 8)).eval()
    strip_and_compare(model, torch.randn(5, 7, 12))


def test_stripped_gated_model_loads_without_lc_kernels(tmp_path):
    model = gated_stack()
    x = torch.randn(4, 9, 12)
    with torch.no_grad():
        before = model(x)
    lc.strip_(model)
    assert error_without_lc_kernels(model, x, before, tmp_path) <= 1e-6


def test_strip_a_compressed_llama():
    model, _ = compressed("llama")
    x = ids()
    before = logits(model, x)
    lc.strip_(model)
    assert not any(type(m).__module__.startswith("lc_kernels") for m in model.modules())
    assert rel_err(logits(model, x), before) <= 1e-6
    with pytest.raises(ValueError, match="itself an LCGatedMLP"):
        lc.strip_(gated_module("partial"))


@pytest.mark.parametrize("stripped", [False, True], ids=["lc", "stripped"])
def test_gated_forms_export_to_onnxruntime(stripped):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = gated_stack()
    if stripped:
        lc.strip_(model)
    x = torch.randn(4, 6, 12)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch, 1: seq},), verbose=False)
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    z = torch.randn(3, 13, 12)  # another batch and sequence length than the export example
    (got,) = sess.run(None, {sess.get_inputs()[0].name: z.numpy()})
    with torch.no_grad():
        want = model(z)
    assert rel_err(torch.from_numpy(got), want) <= 1e-5
