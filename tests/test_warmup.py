"""lc.warmup: per-shape choices measured, cached on disk, read back by a fresh process and used by the
dispatcher; the autotuner's key and its stored configs; what a bad cache or bad argument does.

CPU only: Triton kernels run through the interpreter on tiny shapes, and CUDA dispatch is checked on
fake tensors (no GPU).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import lc_kernels as lc
from lc_kernels.nn import gated as gated_mod
from lc_kernels.nn import mlp as mlp_mod
from lc_kernels.nn.gated import LCGatedMLP
from lc_kernels.nn.mlp import LCChain, LCFusedMLP
from lc_kernels.ops import dispatch, fused_mlp_op, launch, partial, reference, tables
from lc_kernels.timing import Ratio
from conftest import rel_err

W = importlib.import_module("lc_kernels.warmup")  # the module (lc_kernels.warmup is the function)
D = 24


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch, one_thread):
    """A private cache directory and no tables in memory, before and after (other tests see defaults)."""
    monkeypatch.setenv("LC_KERNELS_CACHE", str(tmp_path))
    monkeypatch.delenv("LC_KERNELS_FORCE_TRITON", raising=False)
    monkeypatch.delenv("LC_KERNELS_DISABLE_TRITON", raising=False)
    tables.reset()
    partial.forget()
    yield
    tables.reset()
    partial.forget()


def _partial_mlp(d=D, k=32) -> LCFusedMLP:
    m = LCFusedMLP(d, k, d, act="gelu", alpha_init=0.3)
    m.skip = nn.Linear(d, d, bias=False)
    m.form = "partial"
    return m


def _partial_chain() -> LCChain:
    chain = LCChain([nn.Linear(D, 16), nn.Linear(16, D), nn.Linear(D, 8)], ["silu", "relu"], alpha_init=0.25)
    chain.skips = nn.ModuleDict({"0": nn.Linear(D, D, bias=False)})
    return chain


def _partial_gated() -> LCGatedMLP:
    spec = {"form": "partial", "in_features": 8, "hidden_features": 40, "out_features": 8, "kept": 12,
            "rank": None, "act": "silu", "num_alphas": 1, "packed": True, "bias": False}
    m = LCGatedMLP.empty(spec)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.act.alpha.fill_(0.2)
    return m


class Model(nn.Module):
    """PARTIAL and KEEP LCFusedMLP, a chain with a PARTIAL joint, a PARTIAL gated block."""

    def __init__(self):
        super().__init__()
        self.part, self.keep = _partial_mlp(), LCFusedMLP(D, 48, act="silu", alpha_init=0.2)
        self.chain, self.down, self.gated = _partial_chain(), nn.Linear(8, 8), _partial_gated()

    def forward(self, x):
        return self.gated(self.down(self.chain(self.keep(self.part(x)))))


# Unique choices of Model at rows r: the LCFusedMLP partial, the chain's block, the gated block.
KEYS = ("partial", (D, 32, D, "gelu")), ("partial", (D, 16, D, "silu")), ("gated_partial", (8, 12, 8, "silu"))


def _always(choice):
    def measure(m, x, kind, shape, options):
        assert options[0] == dispatch.SEPARATE and choice in options
        return choice, Ratio(1.5, 1.4, 1.6)

    return measure


def _reference(model: Model, x: torch.Tensor) -> torch.Tensor:
    """The float64 PyTorch truth (ops/reference.py) of Model, written out block by block."""
    m = {k: v.double() for k, v in model.state_dict().items()}
    x = x.double()
    p = model.part
    y = F.linear(x, m["part.skip.weight"]) + reference.fused_mlp(
        x, m["part.fc1.weight"], m["part.fc1.bias"], m["part.act.alpha"], "gelu", m["part.fc2.weight"],
        m["part.fc2.bias"])
    assert p.form == "partial"
    y = reference.fused_mlp(y, m["keep.fc1.weight"], m["keep.fc1.bias"], m["keep.act.alpha"], "silu",
                            m["keep.fc2.weight"], m["keep.fc2.bias"])
    h = reference.fused_linear(y, m["chain.linears.0.weight"], m["chain.linears.0.bias"],
                               m["chain.acts.0.alpha"], "silu")
    z = F.linear(y, m["chain.skips.0.weight"]) + F.linear(h, m["chain.linears.1.weight"], m["chain.linears.1.bias"])
    z = reference.collapsible_activation(z, "relu", m["chain.acts.1.alpha"])
    y = F.linear(z, m["chain.linears.2.weight"], m["chain.linears.2.bias"])
    y = F.linear(y, m["down.weight"], m["down.bias"])
    g = reference.fused_gated_linear(y, m["gated.gate_up_proj.weight"], None, "silu", m["gated.act.alpha"])
    return F.linear(y, m["gated.skip.weight"]) + F.linear(g, m["gated.down_proj.weight"], m["gated.down_proj.bias"])


# ---------------------------------------------------------------- the table: stored, read back, used

def test_warmup_stores_a_table_that_a_fresh_load_reads_and_the_dispatcher_uses(monkeypatch, tmp_path):
    model = Model()
    monkeypatch.setattr(W, "_measure", _always(dispatch.SHARED))
    report = lc.warmup(model, torch.randn(2, 3, D), tokens=[1, 40])  # the example gives 6 rows
    assert report.tokens == [1, 6, 40]
    assert report.measured == len(KEYS) * 3 and report.cached == 0
    assert report.path == os.path.join(str(tmp_path), "warmup.json")
    by_name = {s.name: s for s in report.sites}
    assert set(by_name) == {"part", "keep", "chain", "gated"}
    assert by_name["keep"].choices == []  # no choice for an uncollapsed MLP on CPU
    assert [c.choice for c in by_name["part"].choices] == ["shared"] * 3
    text = str(report)
    assert "partial 24->32->24 gelu @ 40 tokens" in text and "shared (measured: 1.50x" in text

    stored = json.load(open(report.path))
    assert stored["format"] == tables.FORMAT
    (ctx, table), = stored["tables"].items()
    assert ctx == tables.context(torch.device("cpu")) and "1threads" in ctx and lc.__version__ in ctx
    assert {(k, tuple(s), b) for k, dt, b, s, c in table["choices"]} == {
        (k, s, b) for k, s in KEYS for b in (1, 8, 64)}

    # A fresh load: nothing in memory, the dispatcher reads the file at its first question.
    tables.reset()
    partial.forget()
    calls = Counter()
    for mod, name in ((mlp_mod, "shared_mlp"), (gated_mod.partial, "shared_gated")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name: calls.update([_name]) or _real(*a))
    loads = Counter()
    real_load = tables.load
    monkeypatch.setattr(tables, "load", lambda *a, **k: loads.update(["load"]) or real_load(*a, **k))
    x = torch.randn(5, D)  # 5 rows: the bucket of 8, measured at 6
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    assert calls == {"shared_mlp": 2 * 3, "shared_gated": 3}  # LCFusedMLP + chain block, gated block
    assert loads == {"load": 1}  # once per process and device, never per call
    with torch.inference_mode():
        model(torch.randn(300, D))  # a bucket nobody measured: the default form
    assert calls == {"shared_mlp": 2 * 3, "shared_gated": 3}


def test_a_second_process_reads_the_choices(monkeypatch, tmp_path):
    monkeypatch.setattr(W, "_measure", _always(dispatch.SHARED))
    lc.warmup(_partial_mlp(), tokens=16)
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)  # the context the table was measured in
        from lc_kernels.ops import dispatch
        x = torch.randn(16, {D})
        print(dispatch.partial_form(x, {D}, 32, {D}, "gelu"), dispatch.partial_form(x, {D}, 32, {D}, "silu"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LC_KERNELS_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["shared", "separate"]


def test_real_measurement_stores_an_option_and_a_second_warmup_measures_nothing(monkeypatch):
    model = nn.Sequential(_partial_mlp(), _partial_chain())
    first = lc.warmup(model, tokens=8)
    assert first.measured == 2
    for s in first.sites:
        for c in s.choices:
            assert c.choice in (dispatch.SEPARATE, dispatch.SHARED) and c.source == "measured" and "x" in c.ratio
    timed = Counter()
    monkeypatch.setattr(W, "time_interleaved", lambda *a, **k: timed.update(["timed"]))
    tables.reset()
    second = lc.warmup(model, tokens=8)
    assert second.measured == 0 and second.cached == 2 and not timed
    assert [c.choice for s in second.sites for c in s.choices] == [c.choice for s in first.sites for c in s.choices]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, D), (63, D), (2, 5, D)], ids=["one", "m63", "3d"])
def test_outputs_match_the_reference_with_and_without_warmup(monkeypatch, dtype, tol, shape):
    model = Model().to(dtype)
    x = torch.randn(*shape).to(dtype)
    want = _reference(model, x)
    with torch.inference_mode():
        before = model(x)
    monkeypatch.setattr(W, "_measure", _always(dispatch.SHARED))
    lc.warmup(model, x)
    spied = Counter()
    real = mlp_mod.shared_mlp
    monkeypatch.setattr(mlp_mod, "shared_mlp", lambda *a: spied.update(["shared"]) or real(*a))
    with torch.inference_mode():
        after = model(x)
    assert spied["shared"] == 2  # the warmed-up forms ran
    assert before.shape == after.shape == want.shape and after.dtype == dtype
    assert rel_err(before, want) <= tol and rel_err(after, want) <= tol
    if dtype == torch.float32:
        assert rel_err(after, before) <= 1e-6


def test_shared_form_serves_inference_only_and_sees_weight_updates(monkeypatch):
    m = _partial_mlp()
    monkeypatch.setattr(W, "_measure", _always(dispatch.SHARED))
    lc.warmup(m, tokens=4)
    x = torch.randn(4, D)
    out = m(x)  # grad enabled, parameters require grad: the separate form, differentiable
    assert out.grad_fn is not None
    out.sum().backward()
    assert m.fc1.weight.grad is not None and m.skip.weight.grad is not None
    with torch.no_grad():
        first = m(x)
        m.skip.weight.add_(1.0)  # an in-place update (as an optimizer step): the stacked copy follows
        second = m(x)
    assert rel_err(second - first, F.linear(x, torch.ones(D, D))) <= 1e-5


# ---------------------------------------------------------------- a bad cache never crashes

def _write(tmp_path, text):
    (tmp_path / "warmup.json").write_text(text)


@pytest.mark.parametrize("content, match", [
    ("{not json", "unreadable"),
    (json.dumps({"format": "lc_kernels.warmup/0", "tables": {}}), "format"),
    (json.dumps([1, 2]), "format"),
])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content, match):
    _write(tmp_path, content)
    x = torch.randn(4, D)
    with pytest.warns(RuntimeWarning, match=match):
        assert dispatch.partial_form(x, D, 32, D, "gelu") == dispatch.SEPARATE
    tables.reset()
    with pytest.warns(RuntimeWarning, match=match):
        report = lc.warmup(_partial_mlp(), tokens=4)
    assert report.measured == 1
    assert json.load(open(report.path))["format"] == tables.FORMAT  # rewritten whole


def test_tables_of_other_versions_or_malformed_entries_are_ignored(tmp_path):
    cpu = torch.device("cpu")
    ctx = tables.context(cpu)
    old = ctx.replace(f"lc_kernels {lc.__version__}", "lc_kernels 0.0.1")
    entry = [["partial", "float32", 4, [D, 32, D, "gelu"], "shared"]]
    _write(tmp_path, json.dumps({"format": tables.FORMAT, "tables": {old: {"choices": entry}}}))
    x = torch.randn(4, D)
    with pytest.warns(RuntimeWarning, match="other versions"):
        assert dispatch.partial_form(x, D, 32, D, "gelu") == dispatch.SEPARATE
    tables.reset()
    _write(tmp_path, json.dumps({"format": tables.FORMAT, "tables": {ctx: {"choices": [["partial", "float32"]]}}}))
    with pytest.warns(RuntimeWarning, match="malformed"):
        assert dispatch.partial_form(x, D, 32, D, "gelu") == dispatch.SEPARATE
    tables.reset()
    _write(tmp_path, json.dumps({"format": tables.FORMAT, "tables": {ctx: {"choices": entry}}}))
    assert dispatch.partial_form(x, D, 32, D, "gelu") == dispatch.SHARED  # control: the same entry, this version


# ---------------------------------------------------------------- the autotuner: key and stored configs

def test_autotune_keys_name_activation_bias_and_precision():
    from lc_kernels.kernels import fused_gated_linear as fg
    from lc_kernels.kernels import fused_linear as fl
    from lc_kernels.kernels import fused_mlp as fm

    for module, biases in ((fl, ["HAS_BIAS"]), (fm, ["HAS_B1", "HAS_B2"]), (fg, ["HAS_BIAS"])):
        assert {"ACT", "HAS_ALPHA", "INPUT_PRECISION", *biases} <= set(module.AUTOTUNE_KEY), module.__name__
    args = {"x_ptr": torch.empty(2, 3), "N": 9, "K": 7, "M_BUCKET": 16, "ACT": "gelu", "HAS_BIAS": True,
            "HAS_ALPHA": False, "INPUT_PRECISION": "ieee", "DOT_IN_FP32": False}
    key = launch.autotune_key(fl.AUTOTUNE_KEY, args)
    assert key == (9, 7, 16, "gelu", True, False, "ieee", False, "torch.float32")
    variants = [dict(args, ACT="identity"), dict(args, HAS_BIAS=False), dict(args, INPUT_PRECISION="tf32"),
                dict(args, x_ptr=torch.empty(2, 3, dtype=torch.bfloat16))]
    assert len({key, *(launch.autotune_key(fl.AUTOTUNE_KEY, v) for v in variants)}) == 5


def _tiny_autotuner(benched: Counter):
    """fused_linear_kernel autotuned over two interpreter-sized configs, timing stubbed (no driver)."""
    import triton

    from lc_kernels.kernels import fused_linear as fl
    from lc_kernels.kernels.tuning import tile_config

    def bench(fn, quantiles):  # the second config of each pair measures faster
        benched["bench"] += 1
        fn()
        return [1.0] * 3 if benched["bench"] % 2 else [0.5] * 3

    return triton.autotune(configs=[tile_config(16, 16, 16, 1, 1), tile_config(16, 32, 16, 1, 1)],
                           key=fl.AUTOTUNE_KEY, do_bench=bench)(fl.fused_linear_kernel)


CASES = [("gelu", True, torch.float32), ("identity", False, torch.float32), ("gelu", False, torch.float32),
         ("silu", True, torch.bfloat16)]


def _launch_cases(tuned) -> list[tuple]:
    """Launch each case; returns the key Triton filed each under, as launch.autotune_key computes it."""
    keys, real_run = [], tuned.run

    def run(*args, **kwargs):
        named = {**dict(zip(tuned.arg_names, args)), **kwargs}
        keys.append(launch.autotune_key(tuned.keys, named))
        return real_run(*args, **kwargs)

    tuned.run = run
    try:
        for act, bias, dtype in CASES:
            x, w = torch.randn(5, 7).to(dtype), torch.randn(9, 7).to(dtype)
            b = torch.randn(9).to(dtype) if bias else None
            out = torch.full((5, 9), float("nan"), dtype=dtype)
            launch.launch_gemm(lambda: tuned, x, w, b, None, act, out, 9)
            want = reference.fused_linear(x.double(), w.double(), None if b is None else b.double(), None, act)
            assert rel_err(out, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
    finally:
        del tuned.run
    return keys


def test_triton_autotuner_keys_each_activation_bias_and_dtype_apart():
    benched = Counter()
    tuned = _tiny_autotuner(benched)
    keys = _launch_cases(tuned)
    assert set(tuned.cache) == set(keys) and len(keys) == len(CASES)  # four keys, one per case
    assert benched["bench"] == 2 * len(CASES)
    for key, (act, bias, dtype) in zip(keys, CASES):
        assert act in key and bias in key and str(dtype) in key


def test_stored_autotune_configs_seed_a_fresh_autotuner(monkeypatch, tmp_path):
    """Round trip through the cache file under a fake CUDA device name (no GPU needed for the file)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")
    monkeypatch.setattr(tables, "_tuners", {})  # this test's autotuners only, restored after
    gpu = torch.device("cuda", 0)
    benched = Counter()
    first = _tiny_autotuner(benched)
    tables.register_autotuner("fused_linear_kernel", first)
    _launch_cases(first)
    chosen = {k: c.all_kwargs() for k, c in first.cache.items()}
    tables.save(gpu, tmp_path)
    stored = json.load(open(tmp_path / "warmup.json"))["tables"][tables.context(gpu)]["autotune"]
    assert len(stored["fused_linear_kernel"]) == len(CASES)

    tables.reset()
    benched.clear()
    second = _tiny_autotuner(benched)
    tables.register_autotuner("fused_linear_kernel", second)
    assert tables.load(gpu, tmp_path) == len(CASES)
    assert {k: c.all_kwargs() for k, c in second.cache.items()} == chosen
    _launch_cases(second)
    assert benched["bench"] == 0  # every case launched with its stored config, nothing benchmarked

    # A stored config this build no longer offers is not seeded.
    tables.reset()
    third = _tiny_autotuner(benched)
    third.configs = third.configs[:1] + [type(third.configs[0])({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16,
                                                                 "GROUP_M": 8}, num_warps=1, num_stages=1)]
    tables.register_autotuner("fused_linear_kernel", third)
    assert all(c["BLOCK_N"] == 32 for c in chosen.values())  # stored: the config third no longer offers
    tables.load(gpu, tmp_path)
    assert third.cache == {}


# ---------------------------------------------------------------- CUDA dispatch (fake tensors) and constants

def test_measured_fused_mlp_choice_overrides_the_roofline_rule_on_cuda(monkeypatch):
    calls = Counter()
    monkeypatch.setattr(fused_mlp_op, "launch_fused_mlp", lambda *a: calls.update(["fused"]) or a[-1])
    monkeypatch.setattr(fused_mlp_op, "linear_act", lambda x, w, *a: calls.update(["two"]) or x.new_empty(
        (*x.shape[:-1], w.shape[0])))
    monkeypatch.setattr(dispatch, "_sm_count", lambda device: 132)
    d, h, rows = 768, 3072, 4096  # the roofline rule picks two GEMMs here (tests/test_ops.py)
    with FakeTensorMode():
        x = torch.empty(rows, d, device="cuda")
        w1, w2 = torch.empty(h, d, device="cuda"), torch.empty(d, h, device="cuda")
        alpha = torch.empty(1, device="cuda")

        def run():
            calls.clear()
            fused_mlp_op.mlp_act(x, w1, None, alpha, "gelu", w2, None)
            return dict(calls)

        assert run() == {"two": 2}
        tables.record("fused_mlp", x.device, x.dtype, rows, (d, h, d), dispatch.FUSED)
        assert run() == {"fused": 1}
        assert dispatch.prefer_fused_mlp(rows, d, h, d, "cuda:0", torch.float32)
        assert not dispatch.prefer_fused_mlp(rows, d, h, d, "cuda:0")  # no dtype: the rule alone


def test_roofline_constants_per_device_and_dtype(monkeypatch):
    assert dispatch.roofline((9, 0), torch.bfloat16) == dispatch.DEFAULT_ROOFLINE
    assert dispatch.roofline((8, 0), torch.float32) == dispatch.DEFAULT_ROOFLINE  # documented default
    assert dispatch.DEFAULT_ROOFLINE == dispatch.Roofline(dispatch.PEAK_FLOPS, dispatch.PEAK_BYTES, dispatch.LAUNCH_S)
    monkeypatch.setattr(dispatch, "_sm_count", lambda device: 132)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (8, 0))
    cuda = torch.device("cuda", 0)
    assert not dispatch.prefer_fused_mlp(4096, 768, 3072, 768, cuda, torch.bfloat16)
    # A measured device whose memory is 1000x slower: the hidden tensor's traffic now dominates.
    tables.rooflines[((8, 0), torch.bfloat16)] = (989e12, 3.35e9, 3e-6)
    assert dispatch.roofline((8, 0), torch.bfloat16).peak_bytes == 3.35e9
    assert dispatch.roofline((8, 0), torch.float16) == dispatch.DEFAULT_ROOFLINE
    assert dispatch.prefer_fused_mlp(4096, 768, 3072, 768, cuda, torch.bfloat16)


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu:0"])
def test_prefer_fused_mlp_names_a_bad_device(device):
    with pytest.raises(ValueError, match=rf"device '{device}'.*expected a torch.device or a string such as 'cuda'"):
        dispatch.prefer_fused_mlp(16, 8, 8, 8, device)
    with pytest.raises(TypeError, match="got float 1.5"):
        dispatch.prefer_fused_mlp(16, 8, 8, 8, 1.5)


@pytest.mark.parametrize("tokens", [0, -3, [], [4, 0], True, 2.5, "16"])
def test_warmup_refuses_bad_token_counts(tokens):
    with pytest.raises(ValueError, match=r"tokens must be a positive int or a non-empty list.*got"):
        lc.warmup(_partial_mlp(), tokens=tokens)


def test_warmup_refuses_bad_arguments():
    with pytest.raises(ValueError, match="needs the serving shapes: pass example= .* or tokens="):
        lc.warmup(_partial_mlp())
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got str"):
        lc.warmup("model", tokens=4)
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        lc.warmup(_partial_mlp(), tokens=4, cache_dir=3)


def test_warmup_keeps_train_mode_takes_tuple_and_dict_examples_and_warns_without_lc_modules():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = _partial_mlp()

        def forward(self, a, *, b):
            return self.mlp(a + b)

    model = Kw().train()
    r1 = lc.warmup(model, {"a": torch.randn(3, D), "b": torch.randn(3, D)})
    r2 = lc.warmup(nn.Sequential(_partial_mlp()), (torch.randn(7, D),))
    assert r1.tokens == [3] and r2.tokens == [7]
    assert all(m.training for m in model.modules())
    with pytest.warns(UserWarning, match="no LCFusedMLP / LCChain / LCGatedMLP"):
        empty = lc.warmup(nn.Sequential(nn.Linear(4, 4)), tokens=4)
    assert empty.sites == [] and "nothing to do" in str(empty)
