"""``lc-kernels demo``: LayerCollapse end to end on scikit-learn's bundled digits (real data).

Trains the same MLP twice — without and with the collapse regularizer — then plans and
collapses each with no fine-tuning afterwards, and reports accuracy, size, FLOPs and CPU
latency measured in the same run, beside a linear model trained directly (the trivial
baseline: whatever the compressed MLP keeps above it is what the nonlinearity bought).
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.cli._args import nonneg_float, nonneg_int, positive_int, usage_error
from lc_kernels.planning.cost import linear_flops
from lc_kernels.testing import rel_err


@dataclass
class RunResult:
    name: str
    acc_before: float
    acc_after: float
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    ms_before: float
    ms_after: float
    speedup: str = ""  # median ratio with its spread, or "no measurable change"
    predicted: float = 1.0  # what the latency table predicts for the plan (lc.speedup)
    alphas: dict[str, float] = field(default_factory=dict)
    linear_joints: int = 0
    joints: int = 0
    est_error: float | None = None
    measured_error: float | None = None


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    """Digits (1797 8x8 images, 10 classes), stratified 75/25 split, standardised on train."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def build_mlp(widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train(model: nn.Module, xtr, ytr, *, epochs: int, lr: float, alpha_lr: float, strength: float,
          seed: int, desc: str, progress: bool, filter_fn=None) -> None:
    """AdamW with alpha in its own group (see alpha_param_groups), optional regularizer."""
    opt = torch.optim.AdamW(lc.alpha_param_groups(model, lr, alpha_lr=alpha_lr, weight_decay=1e-4))
    reg = lc.CollapseRegularizer(model, strength, warmup_steps=50, filter_fn=filter_fn) if strength > 0 else None
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    bar = _progress(range(epochs), desc, progress)
    for _ in bar:
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            if reg is not None:
                loss = loss + reg()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}", alpha=_alpha_str(model))


def _progress(it, desc: str, on: bool):
    if not on:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, unit="epoch", leave=True)


def site_alphas(model: nn.Module) -> dict[str, float]:
    return {n: m.alpha.detach().mean().item() for n, m in model.named_modules()
            if isinstance(m, lc.CollapsibleActivation)}


def _alpha_str(model: nn.Module) -> str:
    return " ".join(f"{a:.2f}" for a in site_alphas(model).values())


def linear_baseline(xtr, ytr, xte, yte, *, epochs: int, seed: int) -> float:
    """A single Linear layer trained directly: the accuracy any collapse can fall back to."""
    torch.manual_seed(seed)
    model = nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return accuracy(model, xte, yte)


def output_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Measured ``||b(x) - a(x)|| / ||a(x)||`` on ``x``."""
    a.eval(), b.eval()
    with torch.no_grad():
        return rel_err(b(x), a(x))


def trained_mlp(name: str, xtr: torch.Tensor, ytr: torch.Tensor, args, *, strength: float,
                regularize: str) -> nn.Sequential:
    """The demo's MLP, prepared and trained with the regularizer on the last ``args.last_k`` joints
    (``regularize="last_k"``) or on all of them."""
    model = build_mlp(args.widths, args.seed)
    lc.prepare_(model)
    joints = [n for n, _ in lc.regularizer.collapsible_activations(model)]
    chosen = set(joints[-args.last_k:]) if regularize == "last_k" else set(joints)
    with _threads(1):  # tiny matmuls: OpenMP hand-offs between threads cost more than the maths
        train(model, xtr, ytr, epochs=args.epochs, lr=args.lr, alpha_lr=args.alpha_lr, seed=args.seed,
              strength=strength, filter_fn=lambda m, n: n in chosen, desc=name, progress=not args.no_progress)
    return model


def run_one(name: str, data, args, *, strength: float, regularize: str) -> tuple[RunResult, lc.CollapsePlan]:
    xtr, ytr, xte, yte, xcal = data
    model = trained_mlp(name, xtr, ytr, args, strength=strength, regularize=regularize)
    plan = _plan(model, xcal, args)
    collapsed = copy.deepcopy(model)
    lc.collapse_(collapsed, plan, calib=xcal)
    bench_x = xte.repeat((args.latency_batch + len(xte) - 1) // len(xte), 1)[: args.latency_batch]
    lin, total = plan.joint_counts()
    # Interleaved rounds (the benchmarks' timer): timing one model after the other lets
    # background load land on one of them and shows a "speedup" of a model against its copy.
    sp = lc.speedup(model, plan, bench_x, calib=xcal, rounds=21, min_time=0.02)
    ta, tb = sp.model_before, sp.model_after
    res = RunResult(
        name=name, acc_before=accuracy(model, xte, yte), acc_after=accuracy(collapsed, xte, yte),
        params_before=_params(model), params_after=_params(collapsed),
        flops_before=linear_flops(model), flops_after=linear_flops(collapsed),
        ms_before=1e3 * ta.median, ms_after=1e3 * tb.median, speedup=str(sp.measured), predicted=sp.predicted,
        alphas=site_alphas(model), linear_joints=lin, joints=total,
        est_error=plan.measured_error, measured_error=output_error(model, collapsed, xcal),
    )
    return res, plan


def _plan(model: nn.Module, xcal: torch.Tensor, args) -> lc.CollapsePlan:
    """Calibrated plan: with ``--max-error`` the budget decides, else the tol threshold does."""
    return lc.plan_collapse(model, tol=args.tol, calib=xcal, max_error=args.max_error)


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _e(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def format_table(results: list[RunResult], baseline: float) -> str:
    head = ("model", "test acc", "after collapse", "linear joints", "params", "FLOPs/sample",
            "latency ms", "speedup: measured", "predicted", "out err: planned / after collapse")
    rows = [("linear model (trivial baseline)", f"{baseline:.2%}", "-", "-", "-", "-", "-", "-", "-", "-")]
    for r in results:
        rows.append((
            r.name, f"{r.acc_before:.2%}", f"{r.acc_after:.2%} ({100 * (r.acc_after - r.acc_before):+.2f} pp)",
            f"{r.linear_joints}/{r.joints}", f"{r.params_before:,} -> {r.params_after:,}",
            f"{r.flops_before:,} -> {r.flops_after:,} ({r.flops_before / r.flops_after:.1f}x)",
            f"{r.ms_before:.3f} -> {r.ms_after:.3f}", r.speedup, f"{r.predicted:.2f}x",
            f"{_e(r.est_error)} / {_e(r.measured_error)}",
        ))
    w = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    line = lambda row: " | ".join(str(c).ljust(n) for c, n in zip(row, w))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * n for n in w), *map(line, rows)])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed for the split, initialisation and batches (default 0)")
    p.add_argument("--epochs", type=positive_int, default=40, help="training epochs per model (default 40)")
    p.add_argument("--widths", type=positive_int, nargs="+", default=[64, 256, 256, 256, 10],
                   help="Linear widths, input 64 and output 10 (default 64 256 256 256 10)")
    p.add_argument("--strength", type=nonneg_float, default=1.0, help="regularizer strength lambda (default 1.0)")
    p.add_argument("--last-k", type=positive_int, default=None,
                   help="regularize only the last k joints, as in the paper (default: all but the first)")
    p.add_argument("--tol", type=nonneg_float, default=0.05,
                   help="collapse joints with |1-alpha| <= tol (default 0.05)")
    p.add_argument("--max-error", type=nonneg_float, default=None,
                   help="instead of tol, collapse whatever saves most FLOPs while the relative change of the "
                        "logits on calibration rows stays <= this (e.g. 0.01)")
    p.add_argument("--lr", type=nonneg_float, default=1e-3, help="learning rate of the weights (default 1e-3)")
    p.add_argument("--alpha-lr", type=nonneg_float, default=1e-2,
                   help="learning rate of the slopes alpha (default 1e-2)")
    p.add_argument("--latency-batch", type=positive_int, default=4096,
                   help="rows per forward when timing (default 4096)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    n_joints = len(args.widths) - 2
    if len(args.widths) < 3 or args.widths[0] != 64 or args.widths[-1] != 10:
        usage_error("demo", f"--widths must start with 64 (pixels), end with 10 (classes) and have a hidden "
                            f"layer; got {args.widths}")
    args.last_k = max(1, n_joints - 1) if args.last_k is None else args.last_k
    if not 1 <= args.last_k <= n_joints:
        usage_error("demo", f"--last-k must be in 1..{n_joints} for {n_joints} joints, got {args.last_k}")
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_data(args.seed)
    # Calibration rows come from the training split: the test split stays unseen by the planner.
    data = (xtr, ytr, xte, yte, xtr[: 256])
    with _threads(1):
        baseline = linear_baseline(xtr, ytr, xte, yte, epochs=args.epochs, seed=args.seed)
    results, plans = [], []
    for name, strength in (("MLP, no regularizer", 0.0), (f"MLP + LC regularizer (last {args.last_k})", args.strength)):
        r, plan = run_one(name, data, args, strength=strength, regularize="last_k")
        results.append(r)
        plans.append(plan)
    print(f"\nscikit-learn digits: {len(xtr)} train / {len(xte)} test rows, MLP widths {args.widths}, "
          f"seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for r, plan in zip(results, plans):
        print(f"{r.name}: alpha per joint {', '.join(f'{k}={v:.3f}' for k, v in r.alphas.items())}")
        print(plan, "\n")
    print(format_table(results, baseline))
    reg = results[-1]
    print(f"\nThe regularized MLP made {reg.linear_joints}/{reg.joints} joints linear; collapsing them changed test "
          f"accuracy by {100 * (reg.acc_after - reg.acc_before):+.2f} pp with no fine-tuning "
          f"({100 * (reg.acc_after - results[0].acc_before):+.2f} pp vs the unregularized MLP, "
          f"{100 * (reg.acc_after - baseline):+.2f} pp vs the linear baseline).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline_linear_acc": baseline, "results": [asdict(r) for r in results],
                       "plans": [p.to_dict() for p in plans], "args": vars(args)}, f, indent=1, default=str)
    return 0
