"""Regularization effect (the paper's Figure 3 in spirit): test accuracy over training, with and
without the LayerCollapse regularizer, on scikit-learn's digits.

An MLP 64-128-128-128-10 (GELU) is trained from scratch on the same split, batches and inits:
plainly, and prepared with ``loss = cross_entropy + reg()`` at several strengths (lambda = 0:
prepared, slopes trainable, no regularizer). After
training each regularized model is collapsed (``collapse_``, tol 0.05: joints whose slopes
reached 1 merge, the others stay) and evaluated again. Several seeds give mean and spread; a
logistic regression on the pixels is the trivial baseline.

    python benchmarks/experiments/regularization_effect.py [--seed 0] [--seeds 3]
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

import lc_kernels as lc
from _common import accuracy, baselines, batches, digits, environment, n_params, parse_args, seed_all, write

WIDTHS = (64, 128, 128, 128, 10)
# alpha at the weights' lr: at 1e-2 (alpha_param_groups' default 10x) the task gradient alone drove
# the slopes past 1 (1.57 at lambda = 0), and every strength ended fully linear.
EPOCHS, BATCH, LR, ALPHA_LR, WEIGHT_DECAY = 40, 32, 1e-3, 1e-3, 1e-4
STRENGTHS, WARMUP = (0.0, 0.01, 0.1, 1.0), 200
TOL = 0.05


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*layers)


def run(strength: float | None, data: tuple, seed: int) -> dict:
    """Train one model; ``strength=None``: plain, unprepared."""
    xtr, ytr, xte, yte = data
    seed_all(seed)
    model = mlp()
    regularize = strength is not None
    if regularize:
        lc.prepare_(model)
        opt = torch.optim.AdamW(lc.alpha_param_groups(model, LR, alpha_lr=ALPHA_LR, weight_decay=WEIGHT_DECAY))
        reg = lc.CollapseRegularizer(model, strength, warmup_steps=WARMUP)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    per_epoch = -(-len(xtr) // BATCH)
    curve = {"epoch": [], "train_acc": [], "test_acc": [], "mean_alpha": []}
    for step, (xb, yb) in enumerate(batches(xtr, ytr, BATCH, EPOCHS, seed), 1):
        loss = nn.functional.cross_entropy(model(xb), yb) + (reg() if regularize else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % per_epoch == 0:
            curve["epoch"].append(step // per_epoch)
            curve["train_acc"].append(accuracy(model, xtr, ytr))
            curve["test_acc"].append(accuracy(model, xte, yte))
            curve["mean_alpha"].append(np.mean(list(reg.alphas().values())).item() if regularize else None)
    out = {"curve": curve, "final_test_acc": curve["test_acc"][-1], "params": n_params(model)}
    if regularize:
        out["alphas"] = reg.alphas()
        plan = lc.collapse_(model, tol=TOL)
        out.update(collapsed_test_acc=accuracy(model, xte, yte), collapsed_params=n_params(model),
                   joints_linear=plan.joint_counts()[0], joints=plan.joint_counts()[1])
    return out


def main() -> None:
    started = time.perf_counter()
    args = parse_args(__doc__, seeds=(int, 3, "training runs (inits and batch orders) per setting (default 3)"))
    data = digits(args.seed)
    seeds = [args.seed + i for i in range(args.seeds)]
    settings = {"plain": None, **{f"lambda={lam:g}": lam for lam in STRENGTHS}}
    runs = {name: [run(lam, data, s) for s in seeds] for name, lam in settings.items()}
    base = baselines(*data)

    def stats(rs: list[dict], key: str) -> dict:
        v = np.array([r[key] for r in rs], dtype=float)
        return {"mean": v.mean().item(), "std": v.std().item()}

    summary = {name: {k: stats(rs, k) for k in ("final_test_acc", "params")} for name, rs in runs.items()}
    for name in settings:
        if name != "plain":
            summary[name].update({k: stats(runs[name], k)
                                  for k in ("collapsed_test_acc", "collapsed_params", "joints_linear")})
    result = {
        "experiment": "regularization_effect",
        "setup": {"widths": WIDTHS, "activation": "gelu", "epochs": EPOCHS, "batch": BATCH, "lr": LR,
                  "alpha_lr": ALPHA_LR, "weight_decay": WEIGHT_DECAY, "strengths": STRENGTHS,
                  "warmup_steps": WARMUP, "collapse_tol": TOL, "seeds": seeds,
                  "train": len(data[0]), "test": len(data[2])},
        "baselines": base,
        "summary": summary,
        "runs": runs,
        "environment": environment(args, started),
    }
    fig = plot(runs, base)
    write("regularization_effect", args.out, result, fig)
    for name, r in summary.items():
        line = (f"{name:13s} test acc {r['final_test_acc']['mean']:.4f} ± {r['final_test_acc']['std']:.4f}  "
                f"params {r['params']['mean']:.0f}")
        if "collapsed_test_acc" in r:
            line += (f"  -> collapsed {r['collapsed_test_acc']['mean']:.4f} ± {r['collapsed_test_acc']['std']:.4f}"
                     f", params {r['collapsed_params']['mean']:.0f}, linear joints {r['joints_linear']['mean']:.1f}/3")
        print(line)
    print(f"baselines     logistic regression {base['linear_logreg_acc']:.4f} "
          f"({base['linear_logreg_params']} params), majority class {base['majority_class_acc']:.4f}")


def label(name: str) -> str:
    return name.replace("lambda", "λ")


def plot(runs: dict, base: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = dict(zip(runs, ("tab:blue", "tab:purple", "tab:green", "tab:orange", "tab:red")))
    ax, ax2, ax3 = axes
    for name, rs in runs.items():
        ep = rs[0]["curve"]["epoch"]
        v = np.array([r["curve"]["test_acc"] for r in rs])
        ax.plot(ep, v.mean(0), color=colors[name], label=label(name))
        ax.fill_between(ep, v.mean(0) - v.std(0), v.mean(0) + v.std(0), color=colors[name], alpha=0.15)
        if name != "plain":
            a = np.array([r["curve"]["mean_alpha"] for r in rs], dtype=float)
            ax2.plot(ep, a.mean(0), color=colors[name], label=label(name))
    for a in (ax, ax3):
        a.axhline(base["linear_logreg_acc"], color="gray", ls="--",
                  label=f"logistic regression ({base['linear_logreg_acc']:.3f})")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy over training (mean ± std, seeds)",
           ylim=(0.88, 1.0))
    ax.legend(fontsize=8, loc="lower right")
    ax2.set(xlabel="epoch", ylabel="mean α over the 3 joints", title="slopes during training (1 = linear)",
            ylim=(-0.15, 1.05))
    ax2.legend(fontsize=8)
    names = list(runs)
    x = np.arange(len(names))
    final = [np.mean([r["final_test_acc"] for r in runs[n]]) for n in names]
    coll = [np.mean([r.get("collapsed_test_acc", np.nan) for r in runs[n]]) for n in names]
    ax3.bar(x - 0.2, final, 0.4, color=[colors[n] for n in names], label="trained")
    ax3.bar(x + 0.2, coll, 0.4, color=[colors[n] for n in names], alpha=0.45, hatch="//", label="collapsed")
    for i, n in enumerate(names):
        p = np.mean([r.get("collapsed_params", r["params"]) for r in runs[n]])
        ax3.annotate(f"{p / 1e3:.1f}k\nparams", (i, 0.885), ha="center", fontsize=8)
    ax3.set(xticks=x, xticklabels=[label(n) for n in names], ylim=(0.88, 1.0), ylabel="test accuracy",
            title="final test accuracy; after collapse (hatched)")
    ax3.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
