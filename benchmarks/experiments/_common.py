"""Shared pieces of the experiment scripts: digits data, the tiny ViT, baselines, result files.

Everything runs on CPU from data bundled with scikit-learn (no download). Results go to
``benchmarks/results/experiments/<name>.json`` and ``.png`` with the run's environment.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lc_kernels  # noqa: E402,F401  (imported so environment() records its version)
from _report import environment  # noqa: E402,F401  (one environment for every results file)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "experiments"


def parse_args(doc: str, **extra: tuple[type, object, str]) -> argparse.Namespace:
    """``--seed``, ``--out``, ``--threads`` plus script-specific ``name=(type, default, help)``."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="seed for data split, init and batches (default 0)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    # One thread: the models are tiny, and with two threads on a loaded 2-core machine OpenMP
    # spin-waiting made one small Linear 300x slower.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    for name, (typ, default, help_) in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=default, help=help_)
    args = p.parse_args()
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    return args


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images), stratified 80/20 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return f(xtr), g(ytr), f(xte), g(yte)


def baselines(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> dict:
    """Test accuracy of the trivial baselines: majority class and a linear model on the pixels."""
    from sklearn.linear_model import LogisticRegression

    lin = LogisticRegression(max_iter=5000).fit(xtr.numpy(), ytr.numpy())
    majority = torch.bincount(ytr).argmax()
    return {
        "majority_class_acc": (yte == majority).float().mean().item(),
        "linear_logreg_acc": float(lin.score(xte.numpy(), yte.numpy())),
        "linear_logreg_params": int(lin.coef_.size + lin.intercept_.size),
    }


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, seed: int) -> list:
    """Shuffled mini-batches for ``epochs`` passes, drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        out += [(x[perm[i:i + batch_size]], y[perm[i:i + batch_size]]) for i in range(0, len(x), batch_size)]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_vit(depth: int = 4) -> nn.Module:
    """A timm ViT on 8x8 digits: 4x4 patches (4 tokens + class token), width 32, MLP hidden 128.

    2x2 patches (16 tokens) trained 3x slower and reached 92.5% test accuracy, below the
    logistic regression; 4x4 patches reach about 96% in 12 s.
    """
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=depth,
                             num_heads=4, mlp_ratio=4.0)


def as_images(x: torch.Tensor) -> torch.Tensor:
    """(N, 64) pixels in [0, 1] -> (N, 1, 8, 8) centred images for the ViT."""
    return (x.reshape(-1, 1, 8, 8) - 0.5) / 0.5


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int,
                     batch_size: int = 64, weight_decay: float = 0.05) -> nn.Module:
    """Plain AdamW + cross-entropy training with a cosine schedule (no regularizer)."""
    data = batches(x, y, batch_size, epochs, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(data))
    model.train()
    for xb, yb in data:
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def write(name: str, out: Path, result: dict, fig) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.png``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / f"{name}.json", out / f"{name}.png"
    with open(js, "w") as f:
        json.dump(result, f, indent=1)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"wrote {js} and {png}")
    return js, png
