"""Predicted beside measured end-to-end speedup (``lc.speedup``) for FLOP- and latency-planned plans.

One command: ``python benchmarks/experiments/speedup_pairs.py [--quick]``. Three models, each planned
twice (``objective="flops"``, the default, and ``objective="latency"`` at the serving example's
token count), each plan measured end to end on a collapsed copy in interleaved rounds:

- the demo MLP (64-256-256-256-10 on scikit-learn's digits, trained with the collapse regularizer
  on its last two joints as ``lc-kernels demo`` does; calibrated threshold plan), 4096 rows;
- the deep chain of the bench (512→2048→512 ×4, random weights): every other joint at α = 1
  (threshold plan), and training-free fitted collapse at ``target=0.5`` (α = 0 everywhere);
- the ViT-Tiny-shaped encoder of the bench (12 blocks, random weights, 32 × 197 tokens): half the
  MLPs at α = 1 (threshold plan), and fitted collapse at ``target=0.5``.

"predicted" is Amdahl's law on the model's measured time with the sites' share and speedup from
the latency table (``lc_kernels.speedup``); "measured" is the median ratio with its spread, or "no
measurable change" where the spread covers 1.0×. Random weights make the fitted plans' errors
meaningless as quality; they are here for their shapes and timings only.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _report  # noqa: E402
import harness  # noqa: E402

import lc_kernels as lc  # noqa: E402
from lc_kernels.cli import demo  # noqa: E402


def demo_mlp(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """The demo's regularized MLP, trained as ``lc-kernels demo`` trains it."""
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--no-progress", "--last-k", "2"] + (["--epochs", "15"] if quick else []))
    xtr, ytr, xte, _ = demo.load_data(args.seed)
    model = demo.trained_mlp("demo", xtr, ytr, args, strength=args.strength, regularize="last_k")
    x = xte.repeat((4096 + len(xte) - 1) // len(xte), 1)[:4096]
    return model.eval(), x, xtr[:256], {"tol": args.tol}


def deep_chain(alpha_one: bool, quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    shape = harness.SHAPES["deep_chain"]
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(shape.widths, shape.widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(shape.widths) - 2 else [])
    model = nn.Sequential(*layers)
    lc.prepare_(model)
    if alpha_one:
        with torch.no_grad():
            for j, (_, act) in enumerate(lc.regularizer.collapsible_activations(model)):
                if j % 2 == 0:
                    act.alpha.fill_(1.0)
    x = torch.randn(1024 if quick else 4096, shape.widths[0])
    return model.eval(), x, torch.randn(512, shape.widths[0]), {} if alpha_one else {"target": 0.5}


def encoder(alpha_one: bool, quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    shape = harness.SHAPES["vit_tiny_encoder"]
    torch.manual_seed(0)
    model = harness.Encoder(shape.dim, shape.depth, shape.heads, shape.hidden)
    sites = lc.prepare_(model)
    if alpha_one:
        with torch.no_grad():
            for path in sites[shape.depth // 2:]:
                model.get_submodule(path).act.alpha.fill_(1.0)
    x = torch.randn(4 if quick else shape.batch, shape.seq, shape.dim)
    return model.eval(), x, torch.randn(4, shape.seq, shape.dim), {} if alpha_one else {"target": 0.5}


def pairs(name: str, how: str, built, rounds: int) -> list[dict]:
    model, x, calib, kw = built
    rows = []
    by_flops = None
    for objective in ("flops", "latency"):
        extra = {"objective": "latency", "example": x} if objective == "latency" else {}
        t0 = time.perf_counter()
        plan = lc.plan_collapse(model, calib=calib, **kw, **extra)
        planned_s = time.perf_counter() - t0
        same = by_flops is not None and harness.same_plan(by_flops, plan)
        by_flops = by_flops or plan
        row = {"model": name, "plan": how, "objective": objective, "form": harness.form_of(plan),
               "tokens": lc.planning.options.tokens_of(x), "MLP FLOP ratio": plan.flops_before / plan.flops_after,
               "output error": plan.measured_error, "plan s": round(planned_s, 1)}
        if same:
            rows.append({**row, "measured": "same plan as FLOPs"})
            continue
        rep = lc.speedup(model, plan, x, calib=calib, rounds=rounds)
        rows.append({**row, "ms before": 1e3 * rep.model_before.median, "ms after": 1e3 * rep.model_after.median,
                     "predicted": rep.predicted, "measured": str(rep.measured)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = _report.parse_args(__doc__, threads=2)
    started = time.perf_counter()
    rounds = 5 if args.quick else 15
    rows = []
    rows += pairs("demo MLP 64-256-256-256-10", "regularized, calibrated threshold", demo_mlp(args.quick), rounds)
    rows += pairs("deep chain 512→2048→512 ×4", "every other joint α = 1", deep_chain(True, args.quick), rounds)
    rows += pairs("deep chain 512→2048→512 ×4", "fitted, target 0.5", deep_chain(False, args.quick), rounds)
    rows += pairs("ViT-Tiny encoder 12 blocks", "last 6 MLPs α = 1", encoder(True, args.quick), rounds)
    rows += pairs("ViT-Tiny encoder 12 blocks", "fitted, target 0.5", encoder(False, args.quick), rounds)
    columns = ["model", "plan", "objective", "form", "tokens", "MLP FLOP ratio", "ms before", "ms after",
               "predicted", "measured", "output error", "plan s"]
    _report.write_results(
        "speedup_pairs", args.out, rows, columns,
        title="Predicted vs measured end-to-end speedup, FLOP- and latency-planned",
        setup={"rounds": rounds, "latency table": "lc_kernels.planning.latency, user cache (LC_KERNELS_CACHE)",
               "demo": "lc-kernels demo's regularized MLP (strength 1, last 2 joints)"},
        env=_report.environment(args, started),
        notes=["predicted: Amdahl's law on the measured model time, sites' share and speedup from the latency "
               "table; measured: median ratio (spread q1/q3 to q3/q1) of interleaved rounds",
               "MLP FLOP ratio: the planned sites' FLOPs before / after (attention untouched in the encoder)"],
    )


if __name__ == "__main__":
    main()
