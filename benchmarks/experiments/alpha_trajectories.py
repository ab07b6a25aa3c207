"""Alpha trajectories: every site's slope, step by step, while a trained ViT is fine-tuned with the
regularizer — label-free, by self-distillation from its own outputs.

The ViT of ``layerwise_sensitivity.py`` (timm, depth 4, 4x4 patches of the 8x8 digits) is
trained, prepared (all four MLPs collapsible, alpha = 0) and fine-tuned with
``lc_kernels.finetune(teacher="self")``: MSE to the frozen original's logits, no labels, plus
``reg()`` with a linear strength ramp. Two slope learning rates are compared (Adam moves alpha
by about its lr per step, and alpha has to travel 1). Afterwards ``collapse_`` (tol 0.05)
merges every MLP whose slope reached 1, and the test accuracy is measured again.

    python benchmarks/experiments/alpha_trajectories.py [--seed 0]
"""
from __future__ import annotations

import copy
import time

import lc_kernels as lc
from _common import (accuracy, as_images, baselines, batches, digits, environment, n_params, parse_args, seed_all,
                     tiny_vit, train_classifier, write)
from lc_kernels.finetune import finetune

TRAIN_EPOCHS, LR = 40, 3e-3
FT_EPOCHS, FT_LR, STRENGTH, WARMUP, TOL = 10, 5e-4, 1.0, 100, 0.05
ALPHA_LRS = (1e-3, 1e-2)


def main() -> None:
    started = time.perf_counter()
    args = parse_args(__doc__)
    xtr, ytr, xte, yte = data = digits(args.seed)
    xtr, xte = as_images(xtr), as_images(xte)
    seed_all(args.seed)
    trained = train_classifier(tiny_vit(), xtr, ytr, epochs=TRAIN_EPOCHS, lr=LR, seed=args.seed)
    runs = {}
    for alpha_lr in ALPHA_LRS:
        model = copy.deepcopy(trained)
        lc.prepare_(model)
        seed_all(args.seed)
        # Labels are dropped: the teacher's logits are the only target.
        unlabeled = [xb for xb, _ in batches(xtr, ytr, 64, FT_EPOCHS, args.seed)]
        hist = finetune(model, unlabeled, steps=len(unlabeled), lr=FT_LR, alpha_lr=alpha_lr, strength=STRENGTH,
                        warmup_steps=WARMUP, teacher="self", progress=False)
        acc_before = accuracy(model, xte, yte)
        plan = lc.collapse_(model, tol=TOL, force=False)
        runs[f"alpha_lr={alpha_lr:g}"] = {
            "history": hist.to_dict(),
            "final_alphas": {p: v[-1] for p, v in hist.alphas.items()},
            "acc_before_collapse": acc_before,
            "acc_after_collapse": accuracy(model, xte, yte),
            "params_after": n_params(model),
            "decisions": {s.path: s.decision for s in plan.sites},
        }
    base = baselines(*data)
    result = {
        "experiment": "alpha_trajectories",
        "setup": {"model": "timm VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=4, num_heads=4, "
                           "mlp_ratio=4)", "train_epochs": TRAIN_EPOCHS, "finetune_epochs": FT_EPOCHS,
                  "finetune_lr": FT_LR, "alpha_lrs": ALPHA_LRS, "strength": STRENGTH, "warmup_steps": WARMUP,
                  "collapse_tol": TOL, "teacher": "self (MSE to the original's logits, no labels)"},
        "trained": {"acc": accuracy(trained, xte, yte), "params": n_params(trained)},
        "baselines": base,
        "runs": runs,
        "environment": environment(args, started),
    }
    write("alpha_trajectories", args.out, result, plot(runs, result["trained"]))
    print(f"trained ViT: test acc {result['trained']['acc']:.4f}, {result['trained']['params']} params")
    for name, r in runs.items():
        alphas = ", ".join(f"{a:.3f}" for a in r["final_alphas"].values())
        linear = sum(d != "KEEP" for d in r["decisions"].values())
        print(f"{name}: final alphas [{alphas}]; acc {r['acc_before_collapse']:.4f} -> "
              f"{r['acc_after_collapse']:.4f} after collapse ({linear}/4 MLPs merged, {r['params_after']} params)")
    print(f"baselines: logistic regression {base['linear_logreg_acc']:.4f}, majority {base['majority_class_acc']:.4f}")


def plot(runs: dict, trained: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), sharey=True)
    for ax, (name, r) in zip(axes, runs.items()):
        h = r["history"]
        for path, a in h["alphas"].items():
            ax.plot(h["step"], a, label=path.rsplit(".", 2)[0])
        ax.axhspan(1 - TOL, 1 + TOL, color="gray", alpha=0.15, label=f"collapse tol ±{TOL}")
        ax.set(xlabel="fine-tuning step", ylabel="α (0 = GELU, 1 = linear)", ylim=(-0.05, 1.1),
               title=f"{name.replace('alpha', 'α')}: test acc {r['acc_before_collapse']:.3f} → "
                     f"{r['acc_after_collapse']:.3f} collapsed")
        tw = ax.twinx()
        tw.plot(h["step"], h["strength"], "k:", lw=1)
        tw.set_ylabel("λ (dotted)")
        tw.set_ylim(0, STRENGTH * 1.1)
        ax.legend(fontsize=8, loc="center right")
    fig.suptitle(f"self-distillation fine-tune of a trained ViT (acc {trained['acc']:.3f}), no labels", y=1.02)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
