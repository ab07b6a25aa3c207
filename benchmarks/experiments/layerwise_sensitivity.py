"""Layer-wise collapse sensitivity (the paper's Figure 4 in spirit): a small ViT on the digits
with its last k MLPs collapsed, k = 0 ... all — test accuracy and parameters per k.

A timm VisionTransformer (depth 4, width 32, MLP hidden 128, 4x4 patches of the 8x8 digits) is
trained from scratch. Then, from that checkpoint, for each k:

- *direct*: ``prepare_`` and collapse the last k MLPs at once (GELU -> identity, no training);
- *fine-tuned*: ``prepare_``, fine-tune with ``lc_kernels.finetune`` (labels + the regularizer on
  the last k MLPs only; k = 0 gets the same epochs at strength 0), then collapse those k.

Each MLP is also collapsed alone (direct) to show which layer the accuracy depends on. A
logistic regression on the pixels is the trivial baseline.

    python benchmarks/experiments/layerwise_sensitivity.py [--seed 0] [--seeds 2]
"""
from __future__ import annotations

import copy
import time

import numpy as np
from torch import nn

import lc_kernels as lc
from _common import (accuracy, as_images, baselines, batches, digits, environment, n_params, parse_args, seed_all,
                     tiny_vit, train_classifier, write)
from lc_kernels.finetune import finetune

DEPTH = 4
TRAIN_EPOCHS, LR = 40, 3e-3
FT_EPOCHS, FT_LR, FT_ALPHA_LR, STRENGTH, WARMUP = 10, 5e-4, 1e-2, 1.0, 50


def collapse_sites(model: nn.Module, paths: list[str]) -> None:
    """Collapse exactly the sites in ``paths`` whatever their slopes (a forced plan, restricted)."""
    if not paths:
        return
    plan = lc.plan_collapse(model, force=True)
    plan.sites = [s for s in plan.sites if s.path in paths]
    lc.collapse_(model, plan)


def last_k(k: int) -> list[str]:
    return [f"blocks.{i}.mlp" for i in range(DEPTH - k, DEPTH)]


def run_seed(seed: int, data: tuple) -> dict:
    xtr, ytr, xte, yte = data
    xtr, xte = as_images(xtr), as_images(xte)
    seed_all(seed)
    trained = train_classifier(tiny_vit(DEPTH), xtr, ytr, epochs=TRAIN_EPOCHS, lr=LR, seed=seed)
    out = {"trained_acc": accuracy(trained, xte, yte), "trained_params": n_params(trained),
           "direct": [], "finetuned": [], "single": []}
    for k in range(DEPTH + 1):
        m = copy.deepcopy(trained)
        lc.prepare_(m)
        collapse_sites(m, last_k(k))
        out["direct"].append({"k": k, "acc": accuracy(m, xte, yte), "params": n_params(m)})

        m = copy.deepcopy(trained)
        lc.prepare_(m)
        chosen = last_k(k)
        seed_all(seed)
        ft_data = batches(xtr, ytr, 64, FT_EPOCHS, seed)
        hist = finetune(m, ft_data, steps=len(ft_data), lr=FT_LR, alpha_lr=FT_ALPHA_LR,
                        strength=STRENGTH if k else 0.0, warmup_steps=WARMUP, log_every=10, progress=False,
                        reg_filter=(lambda mod, path, chosen=chosen: any(path.startswith(c + ".") for c in chosen))
                        if k else None)
        alphas = {p.rsplit(".", 1)[0]: v[-1] for p, v in hist.alphas.items()}
        acc_before = accuracy(m, xte, yte)
        collapse_sites(m, chosen)
        out["finetuned"].append({"k": k, "acc": accuracy(m, xte, yte), "acc_before_collapse": acc_before,
                                 "params": n_params(m), "alphas": {c: alphas[c] for c in chosen}})
    for i in range(DEPTH):
        m = copy.deepcopy(trained)
        lc.prepare_(m)
        collapse_sites(m, [f"blocks.{i}.mlp"])
        out["single"].append({"block": i, "acc": accuracy(m, xte, yte)})
    return out


def main() -> None:
    started = time.perf_counter()
    args = parse_args(__doc__, seeds=(int, 2, "independent trainings of the ViT (default 2)"))
    data = digits(args.seed)
    seeds = [args.seed + i for i in range(args.seeds)]
    runs = [run_seed(s, data) for s in seeds]
    base = baselines(*data)

    def mean(key: str, field: str = "acc") -> list[float]:
        return np.mean([[r[field] for r in run[key]] for run in runs], axis=0).tolist()

    summary = {
        "trained_acc": float(np.mean([r["trained_acc"] for r in runs])),
        "trained_params": runs[0]["trained_params"],
        "k": list(range(DEPTH + 1)),
        "direct_acc": mean("direct"),
        "finetuned_acc": mean("finetuned"),
        "finetuned_acc_before_collapse": mean("finetuned", "acc_before_collapse"),
        "params": mean("direct", "params"),
        "single_block_direct_acc": mean("single"),
    }
    result = {
        "experiment": "layerwise_sensitivity",
        "setup": {"model": "timm VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=4, num_heads=4, "
                           "mlp_ratio=4)", "train_epochs": TRAIN_EPOCHS, "lr": LR, "finetune_epochs": FT_EPOCHS,
                  "finetune_lr": FT_LR, "finetune_alpha_lr": FT_ALPHA_LR, "strength": STRENGTH,
                  "warmup_steps": WARMUP, "seeds": seeds, "collapse_order": "last k MLPs"},
        "baselines": base,
        "summary": summary,
        "runs": runs,
        "environment": environment(args, started),
    }
    write("layerwise_sensitivity", args.out, result, plot(summary, base))
    print(f"trained ViT: test acc {summary['trained_acc']:.4f}, {summary['trained_params']} params")
    print(" k  params  direct  fine-tuned")
    for k in summary["k"]:
        print(f"{k:2d}  {summary['params'][k]:6.0f}  {summary['direct_acc'][k]:.4f}  {summary['finetuned_acc'][k]:.4f}")
    print("one block collapsed alone (direct): "
          + ", ".join(f"block {i}: {a:.4f}" for i, a in enumerate(summary["single_block_direct_acc"])))
    print(f"baselines: logistic regression {base['linear_logreg_acc']:.4f}, majority {base['majority_class_acc']:.4f}")


def plot(s: dict, base: dict):
    import matplotlib.pyplot as plt

    fig, (ax, ax3) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(s["k"], s["finetuned_acc"], "o-", color="tab:red", label="regularized fine-tune, then collapse")
    ax.plot(s["k"], s["direct_acc"], "s--", color="tab:blue", label="collapse directly (no training)")
    ax.axhline(base["linear_logreg_acc"], color="gray", ls="--",
               label=f"logistic regression ({base['linear_logreg_acc']:.3f})")
    ax.set(xlabel="k = MLPs collapsed (the last k blocks)", ylabel="test accuracy", xticks=s["k"], ylim=(0.8, 1.0),
           title=f"ViT on digits: accuracy vs MLPs collapsed (majority class: {base['majority_class_acc']:.2f})")
    ax2 = ax.twinx()
    ax2.bar(s["k"], [p / 1e3 for p in s["params"]], width=0.35, color="tab:green", alpha=0.25)
    ax2.set_ylabel("parameters (k, green bars)")
    ax2.set_ylim(0, max(s["params"]) / 1e3 * 1.1)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    blocks = list(range(len(s["single_block_direct_acc"])))
    ax3.plot(blocks, s["single_block_direct_acc"], "s", color="tab:blue", ms=9, label="that MLP collapsed")
    ax3.axhline(s["trained_acc"], color="black", ls="-", lw=1, label=f"trained ViT ({s['trained_acc']:.3f})")
    ax3.set(xlabel="block whose MLP is collapsed alone", ylabel="test accuracy", xticks=blocks, ylim=(0.8, 1.0),
            title="one MLP collapsed directly")
    ax3.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
