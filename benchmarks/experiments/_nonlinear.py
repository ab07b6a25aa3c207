"""A task that needs its nonlinearity, the MLP that solves it, and the compression peers.

Why a synthetic task: on the digits of ``_common.py`` a logistic regression already reaches
~96%, so "we collapsed the MLP to a linear map and kept the accuracy" proves nothing. Here a
linear model is stuck near 30% while the MLP reaches ~70%: every point of accuracy a
compressed model keeps above 30% is nonlinearity it kept.

Data (offline, deterministic in ``seed``): 60 Gaussian clusters in a 6-dimensional latent
space, 6 clusters per class at random places (so every class is multi-modal, an XOR-like
layout no hyperplane separates), plus 34 dimensions of pure noise, the whole rotated by a
random orthogonal 40x40 matrix so no input coordinate is special. The generative model is
known, so the Bayes-optimal accuracy is computed exactly (:func:`bayes_accuracy`).

Peers (each takes the trained dense model and returns ``(model, test accuracy, FLOPs/sample)``):
``linear_baseline``, ``authors_recipe`` (LayerCollapse as the paper does it, through the
package's public API; ``authors_train`` + ``authors_collapse`` are its two halves, so one
training serves several budgets), ``untrained_collapse`` (prepare + plan + collapse with no
training, algebraic or fitted), ``width_pruning`` (Torch-Pruning, with and without fine-tuning),
and the slot ``ours`` for ``lc.compress``. Budgets are fractions of the dense MLP's FLOPs.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _common import accuracy  # noqa: F401  (the experiments' one accuracy; nonlinear_task uses N.accuracy)

D_IN, N_CLASSES, LATENT, PER_CLASS, SIGMA = 40, 10, 6, 6, 0.55
N_TRAIN, N_VAL, N_TEST = 50_000, 5_000, 10_000
HIDDEN = (512, 512, 512)
BATCH = 256

Split = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# data


def _sample(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, Bayes-optimal prediction) for ``n`` points of the task fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(N_CLASSES * PER_CLASS, LATENT, generator=g)
    cls = torch.arange(N_CLASSES * PER_CLASS) % N_CLASSES  # balanced: PER_CLASS clusters each
    rot, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))
    comp = torch.randint(0, len(centres), (n,), generator=g)
    z = centres[comp] + SIGMA * torch.randn(n, LATENT, generator=g)
    x = torch.cat([z, torch.randn(n, D_IN - LATENT, generator=g)], 1) @ rot.T
    # Posterior over clusters (equal priors, isotropic noise), summed per class: the best any
    # classifier can do. The noise dimensions carry no information, so z alone suffices.
    post = torch.softmax(-torch.cdist(z, centres).square() / (2 * SIGMA**2), 1)
    bayes = torch.zeros(n, N_CLASSES).index_add_(1, cls, post).argmax(1)
    return x, cls[comp], bayes


def make_data(seed: int = 0) -> tuple[Split, Split, Split]:
    """(train, val, test) as (x float32 (n, 40), y int64 (n,)); 50k / 5k / 10k points."""
    x, y, _ = _sample(seed, N_TRAIN + N_VAL + N_TEST)
    a, b = N_TRAIN, N_TRAIN + N_VAL
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def bayes_accuracy(seed: int = 0) -> float:
    """Accuracy of the Bayes-optimal classifier on the test split of ``make_data(seed)``."""
    _, y, bayes = _sample(seed, N_TRAIN + N_VAL + N_TEST)
    return (bayes[N_TRAIN + N_VAL:] == y[N_TRAIN + N_VAL:]).float().mean().item()


def logistic_regression_accuracy(data: tuple[Split, Split, Split]) -> float:
    """scikit-learn's logistic regression (fitted to convergence): the linear ceiling, for reference."""
    from sklearn.linear_model import LogisticRegression

    (xtr, ytr), _, (xte, yte) = data
    return float(LogisticRegression(max_iter=2000).fit(xtr.numpy(), ytr.numpy()).score(xte.numpy(), yte.numpy()))


# ----------------------------------------------------------------------------------------------
# model, training, metrics


def build_mlp(hidden: tuple[int, ...] = HIDDEN) -> nn.Sequential:
    """40 -> 512 -> 512 -> 512 -> 10 with ReLU: a plain nn.Sequential, as a user would write it."""
    layers, d = [], D_IN
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, N_CLASSES))


def steps_per_epoch(data: tuple[Split, Split, Split], batch_size: int = BATCH) -> int:
    return len(data[0][0]) // batch_size


def train(model: nn.Module, data: tuple[Split, Split, Split], epochs: int | None = None, lr: float = 2e-3,
          extra_loss: Callable[[], torch.Tensor] | None = None, *, steps: int | None = None,
          param_groups: list[dict] | None = None, batch_size: int = BATCH, weight_decay: float = 0.01,
          seed: int = 0) -> nn.Module:
    """AdamW on cross-entropy, 5% linear warm-up then cosine decay to 0; returns the model in eval mode.

    Give ``epochs`` (full passes, last partial batch dropped) or ``steps``. ``extra_loss()`` is
    added to every step's loss (e.g. ``lc.CollapseRegularizer``); ``param_groups`` replaces
    ``model.parameters()`` (e.g. ``lc.alpha_param_groups``; a group's own lr is scaled by the
    same schedule). The same optimizer family serves training and every peer's fine-tuning, so
    budgets in steps compare like with like.
    """
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs and steps, got epochs={epochs!r}, steps={steps!r}")
    (x, y), _, _ = data
    total = epochs * steps_per_epoch(data, batch_size) if steps is None else steps
    if total <= 0:
        return model.eval()
    opt = torch.optim.AdamW(param_groups if param_groups is not None else model.parameters(), lr=lr,
                            weight_decay=weight_decay)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < total:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == total:
                break
    return model.eval()


def mlp_flops(model: nn.Module) -> int:
    """FLOPs per sample: ``2·in·out`` for every nn.Linear the model holds, whatever its form.

    Pruned, merged, factored or partial models are all made of nn.Linear, so counting the
    modules (not the original widths) is right for every peer.
    """
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


# ----------------------------------------------------------------------------------------------
# peers

FT_LR = 5e-4  # fine-tuning lr of every peer: a quarter of the training lr, the same AdamW + cosine


def linear_baseline(model: nn.Module, data: tuple[Split, Split, Split], steps: int, lr: float = 2e-3
                    ) -> tuple[nn.Module, float, int]:
    """A single Linear 40 -> 10 trained from scratch for ``steps`` (the dense MLP's own budget).

    ``model`` is ignored: it is there so every peer has the same call shape.
    """
    lin = train(nn.Linear(D_IN, N_CLASSES), data, steps=steps, lr=lr)
    return lin, accuracy(lin, *data[2]), mlp_flops(lin)


def _all_linear_flops(widths: list[int]) -> int:
    """Cheapest FLOPs of a chain of Linears with every joint linear (DESIGN §3: a 1-D DP over groups)."""
    best = [0] + [math.inf] * (len(widths) - 1)
    for q in range(1, len(widths)):
        best[q] = min(best[p] + 2 * widths[p] * widths[q] for p in range(q))
    return int(best[-1])


def lc_target_for(model: nn.Module, flops_budget: float) -> float:
    """The ``target`` of ``lc.plan_collapse`` that leaves at most ``flops_budget`` of the FLOPs.

    ``target`` is the fraction of the collapsible sites' dense FLOPs to remove; the rest of the
    model (Linears outside every site) stays. ``model`` must be prepared.
    """
    import lc_kernels as lc

    full = lc.plan_collapse(model, force=True)
    before = sum(s.flops_before for s in full.sites)
    removable = before - sum(s.flops_after for s in full.sites)
    dense = mlp_flops(model)
    need = dense - flops_budget * dense  # FLOPs that must go
    if need > removable:
        raise ValueError(f"a budget of {flops_budget:.0%} of {dense} FLOPs needs {need:.0f} removed; "
                         f"collapsing everything removes only {removable}")
    return min(1.0, max(need / before, 1e-6))


def authors_train(model: nn.Module, data: tuple[Split, Split, Split], steps: int, lam: float,
                  lr: float = FT_LR, alpha_lr: float | None = None) -> nn.Module:
    """The paper's training phase on a deepcopy: ReLU -> collapsible (α per layer), CE + λ·Σ(1−α)².

    α gets its own parameter group (``lc.alpha_param_groups``: 10x lr, no weight decay), as the
    library recommends: with one lr α would stall short of 1 (DESIGN §3).
    """
    import lc_kernels as lc

    m = copy.deepcopy(model)
    lc.prepare_(m)
    reg = lc.CollapseRegularizer(m, lam)
    groups = lc.alpha_param_groups(m, lr=lr, alpha_lr=alpha_lr, weight_decay=0.01)
    return train(m, data, steps=steps, lr=lr, extra_loss=reg, param_groups=groups)


def alphas_of(model: nn.Module) -> list[float]:
    """Mean slope of every collapsible activation, in module order (for the report)."""
    import lc_kernels as lc

    return [round(a.alpha.detach().mean().item(), 4) for a in model.modules() if isinstance(a, lc.CollapsibleActivation)]


def authors_collapse(trained: nn.Module, data: tuple[Split, Split, Split], flops_budget: float, *,
                     fit: bool = False, n_calib: int = 2048) -> tuple[nn.Module, float, int, dict]:
    """Plan with a FLOP target on validation inputs, collapse a deepcopy; (model, acc, FLOPs, info).

    ``fit=False`` is the paper: each linearised joint becomes the algebraic merge ``W2·W1``.
    ``fit=True`` lets the library replace it by the least-squares map fitted on ``calib`` (and
    fold PARTIAL channel subsets) — the fitted collapse of DESIGN §3 on the same trained model,
    which isolates what fitting adds. ``trained`` must be prepared (``lc.prepare_``).

    A fitted plan must be applied with the same ``calib`` (the replacements are refitted); an
    algebraic one gets none. If ``collapse_`` refuses the plan (it guards each site's error
    bound), the refusal is kept in ``info["refused"]`` and the plan is applied with
    ``force=True``: the budget, not the bound, is what this comparison fixes.
    """
    import lc_kernels as lc

    m = copy.deepcopy(trained)
    t = lc_target_for(m, flops_budget)
    calib = data[1][0][:n_calib]
    plan = lc.plan_collapse(m, calib=calib, target=t, fit=fit)
    fitted = bool(getattr(plan, "fit", False))
    info = {"target": round(t, 4), "fit": fitted, "decisions": [s.decision for s in plan.sites],
            "planned_error": plan.measured_error, "alphas": alphas_of(m)}
    apply_calib = calib if fitted else None
    try:
        lc.collapse_(m, plan, calib=apply_calib)
    except ValueError as exc:
        info["refused"] = str(exc)
        lc.collapse_(m, plan, calib=apply_calib, force=True)
    return m, accuracy(m, *data[2]), mlp_flops(m), info


def authors_recipe(model: nn.Module, data: tuple[Split, Split, Split], steps: int, lam: float,
                   flops_budget: float = 0.5) -> tuple[nn.Module, float, int]:
    """LayerCollapse as the paper does it: regularized training for ``steps``, then merge to budget."""
    m, acc, flops, _ = authors_collapse(authors_train(model, data, steps, lam), data, flops_budget)
    return m, acc, flops


def untrained_collapse(model: nn.Module, data: tuple[Split, Split, Split], flops_budget: float, *, fit: bool
                       ) -> tuple[nn.Module, float, int, dict]:
    """No training at all: ``lc.prepare_`` (every α = 0) then plan + collapse to the budget.

    With ``fit=False`` this is the exact-merge baseline (W2·W1 through live ReLUs); with
    ``fit=True`` it is the library's fitted collapse with zero healing steps — the lower end of
    what ``ours`` (``lc.compress``) will do.
    """
    import lc_kernels as lc

    m = copy.deepcopy(model)
    lc.prepare_(m)
    return authors_collapse(m, data, flops_budget, fit=fit)


def uniform_width_for(model: nn.Module, flops_budget: float) -> int:
    """The widest uniform hidden width whose MLP costs at most ``flops_budget`` of the dense FLOPs."""
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    d_in, d_out, n_hidden = lins[0].in_features, lins[-1].out_features, len(lins) - 1
    cost = lambda w: 2 * (d_in * w + (n_hidden - 1) * w * w + w * d_out)  # noqa: E731
    budget = flops_budget * mlp_flops(model)
    w = max(w for w in range(1, lins[0].out_features + 1) if cost(w) <= budget)
    return w


def width_pruning(model: nn.Module, data: tuple[Split, Split, Split], flops_budget: float, finetune_steps: int,
                  lr: float = FT_LR) -> tuple[nn.Module, float, int]:
    """Torch-Pruning: L2-magnitude structured pruning of every hidden width to fit the FLOP budget.

    ``GroupMagnitudeImportance(p=2)`` scores each hidden channel by the norm of all the weights
    that go with it (its row in one Linear, its column in the next); the output layer is ignored
    so the 10 classes stay. The ratio is set so the uniform width is the widest that fits.
    """
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    width = uniform_width_for(m, flops_budget)
    hidden = [lin for lin in m.modules() if isinstance(lin, nn.Linear)][:-1]
    ratio = 1 - width / hidden[0].out_features  # exact in binary for 512: n_pruned = 512 - width
    pruner = tp.pruner.MetaPruner(m, example_inputs=torch.randn(2, D_IN),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[[lin for lin in m.modules() if isinstance(lin, nn.Linear)][-1]])
    pruner.step()
    got = [lin.out_features for lin in m.modules() if isinstance(lin, nn.Linear)][:-1]
    if got != [width] * len(hidden):
        raise RuntimeError(f"Torch-Pruning left hidden widths {got}, wanted {width} each")
    train(m, data, steps=finetune_steps, lr=lr)
    return m, accuracy(m, *data[2]), mlp_flops(m)


def ours(model: nn.Module, data: tuple[Split, Split, Split], flops_budget: float, heal_steps: int, *,
         labels: bool = False, fit: str = "global", select: str = "activation") -> tuple[nn.Module, float, int, dict]:
    """The library's one call on a deepcopy of the dense model: ``lc.compress`` prepares it, plans
    with replacements fitted to validation inputs (PARTIAL widths chosen from the data; ``fit`` and
    ``select`` as in ``plan_collapse``), installs the fits and, with ``heal_steps``, heals on the
    training split: by self-distillation on its inputs (no labels: the dense model's own outputs
    are the teacher) or, with ``labels``, with the task's cross-entropy through ``heal_loss`` (what
    the fine-tuned width-pruning peer trains with)."""
    import lc_kernels as lc

    m = copy.deepcopy(model).eval()
    probe = copy.deepcopy(m)
    lc.prepare_(probe)
    target = lc_target_for(probe, flops_budget)
    (xtr, ytr) = data[0]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(xtr.shape[0], generator=g)
    if labels:
        heal = [(xtr[i], ytr[i]) for i in order.split(BATCH)]
        loss = lambda mod, b: F.cross_entropy(mod(b[0]), b[1])  # noqa: E731
        report = lc.compress(m, data[1][0][:2048], target=target, heal_steps=heal_steps, heal_data=heal,
                             heal_lr=FT_LR, progress=False, fit=fit, select=select, heal_loss=loss,
                             forward_fn=lambda mod, b: mod(b[0]) if isinstance(b, tuple) else mod(b))
    else:
        heal = [xtr[i] for i in order.split(BATCH)]
        report = lc.compress(m, data[1][0][:2048], target=target, heal_steps=heal_steps, heal_data=heal,
                             heal_lr=FT_LR, progress=False, fit=fit, select=select)
    info = {"decisions": "/".join(s.decision for s in report.steps),
            "planned_error": report.plan.measured_error, "final_error": report.final_error,
            "healed": report.steps[-1].healed_error is not None and report.steps[-1].healed_error != report.steps[-1].model_error}
    return m, accuracy(m, *data[2]), mlp_flops(m), info
