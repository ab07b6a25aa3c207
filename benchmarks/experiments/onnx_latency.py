"""onnxruntime latency of the pretrained encoder (all-MiniLM-L6-v2) before and after ``lc.compress``.

One command: ``python benchmarks/experiments/onnx_latency.py [--quick]``. The encoder is compressed
training-free (fitted collapse of its FFNs, target 0.5), both models are exported with
``torch.onnx.export(..., dynamo=True)`` with dynamic batch and sequence dimensions, and the two
onnxruntime sessions are timed in interleaved rounds on the same real held-out batch (Python
standard-library sentences, padded to the longest). Reported: median latency with the spread,
the speedup with its spread (``no measurable change`` when the spread covers 1.0x), the FLOP ratio
of the Linear layers and of the FFNs beside it, and the held-out cosine of the ONNX model's
embeddings to the dense ones.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _encoder as enc  # noqa: E402
import _report  # noqa: E402

import lc_kernels as lc  # noqa: E402
from lc_kernels.planning.cost import linear_flops  # noqa: E402
from lc_kernels.timing import Ratio, time_interleaved  # noqa: E402


class _Embedder(torch.nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state``: the ONNX graph's one output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(model: torch.nn.Module, example: dict, path: Path) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=enc.MAX_LEN)
    program = torch.onnx.export(_Embedder(model).eval(), (example["input_ids"], example["attention_mask"]),
                                dynamo=True, input_names=["input_ids", "attention_mask"],
                                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)
    program.save(str(path))


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    args = _report.parse_args(__doc__, threads=2)
    args.target = 0.5
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tok = enc.load_encoder()
    text = enc.corpus(args.seed, n_calibration=128 if args.quick else 512, n_heldout=64 if args.quick else 256)
    calib = enc.batches(tok, text.calibration, 32)
    heldout = enc.batches(tok, text.heldout, 32)
    dense = copy.deepcopy(model)
    t0 = time.time()
    report = lc.compress(model, calib, target=args.target, progress=False)
    compress_s = time.time() - t0
    lc.strip_(model)  # plain PyTorch: the ONNX graph holds only standard operators either way

    out = _report.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    paths = {"dense": out / "_dense.onnx", "compressed": out / "_compressed.onnx"}
    export(dense, heldout[0], paths["dense"])
    export(model, heldout[0], paths["compressed"])
    sess = {k: session(p, args.threads) for k, p in paths.items()}

    # Real held-out batches at serving sizes: 32 sentences padded to the longest, a typical one
    # (the median length) and the longest (batches are sorted by length).
    timed = {}
    for label, x in (("median-length batch", heldout[len(heldout) // 2]), ("longest batch", heldout[-1])):
        feeds = {"input_ids": x["input_ids"].numpy(), "attention_mask": x["attention_mask"].numpy()}
        calls = {k: (lambda s=s, f=feeds: s.run(None, f)) for k, s in sess.items()}
        timed[label] = (x, time_interleaved(calls, torch.device("cpu"), rounds=5 if args.quick else 21, warmup=3,
                                            min_time=0.2))

    ref = enc.embed(dense, heldout)
    got = []
    for b in heldout:
        (h,) = sess["compressed"].run(None, {"input_ids": b["input_ids"].numpy(),
                                             "attention_mask": b["attention_mask"].numpy()})
        got.append(enc.mean_pool(torch.from_numpy(h), b["attention_mask"]))
    got = torch.nn.functional.normalize(torch.cat(got), dim=-1)
    cosine = float((got * ref).sum(-1).mean())

    rows = []
    for label, (x, timing) in timed.items():
        td, tc = timing["dense"], timing["compressed"]
        shape = f"{x['input_ids'].shape[0]} x {x['input_ids'].shape[1]} tokens"
        rows.append({"model": "dense all-MiniLM-L6-v2", "batch": shape, "median_ms": 1e3 * td.median,
                     "iqr_ms": 1e3 * (td.q3 - td.q1), "linear_flops_per_token": linear_flops(dense),
                     "ffn_flops_per_token": enc.ffn_flops(dense), "heldout_cosine": 1.0,
                     "speedup": "1.00x (baseline)"})
        rows.append({"model": "lc.compress(target=0.5), training-free", "batch": shape,
                     "median_ms": 1e3 * tc.median, "iqr_ms": 1e3 * (tc.q3 - tc.q1),
                     "linear_flops_per_token": linear_flops(model), "ffn_flops_per_token": report.flops_after,
                     "heldout_cosine": cosine, "speedup": str(Ratio.of(td, tc))})
    setup = {
        "batches": "32 held-out sentences padded to the longest: the median-length and the longest batch",
        "linear_flop_ratio": f"{linear_flops(dense) / linear_flops(model):.2f}x fewer Linear FLOPs",
        "ffn_flop_ratio": f"{report.flops_before / max(report.flops_after, 1):.2f}x fewer FFN FLOPs",
        "ffn_flops_removed": f"{report.flops_removed:.1%}",
        "compress_seconds": round(compress_s, 1),
        "decisions": [s.decision for s in report.steps],
        "onnxruntime_threads": args.threads,
        "timing": "median and quartiles over interleaved rounds (lc_kernels.timing.time_interleaved)",
    }
    for p in paths.values():
        p.unlink(missing_ok=True)
        Path(str(p) + ".data").unlink(missing_ok=True)
    _report.write_results("onnx_latency", args.out, rows,
                          ["model", "batch", "median_ms", "iqr_ms", "speedup", "linear_flops_per_token",
                           "ffn_flops_per_token", "heldout_cosine"],
                          title="onnxruntime latency: all-MiniLM-L6-v2 dense vs lc.compress", setup=setup,
                          env=_report.environment(args, started))


if __name__ == "__main__":
    main()
