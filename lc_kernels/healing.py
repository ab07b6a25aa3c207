"""Healing: a short recovery training of a compressed model, judged on rows it never trained on.

:func:`heal` is the loop :func:`~lc_kernels.compress` runs after installing a plan's fits:

- AdamW (no weight decay: decay would pull the fitted maps toward 0), linear warm-up then cosine
  decay to 0 (:func:`lr_factor`), gradient clipping by global norm;
- a trainable set chosen for the job (:data:`TRAINABLE`): ``"sites"`` the compressed sites' weights
  (kept channels' gate / up / down and the fitted skip; slopes frozen), ``"skip"`` only the fitted
  linear maps (skip, down projection), ``"adapters"`` low-rank adapters on the sites' Linears,
  merged back into their weights at the end (the served model has no extra module), ``"all"``
  every weight of the model but the slopes. Everything else has ``requires_grad=False`` while
  healing runs (no weight-gradient GEMMs, no autograd before the first trainable module); the flags
  are restored afterwards and no parameter keeps a ``.grad``;
- a guard: the held-out loss is measured before, every ``eval_every`` steps and at the end; a CPU
  copy of the trainable tensors at the best point is kept and restored at the end, so a run that
  never beats the start leaves the model exactly as it was. An exception restores the trainable
  tensors, the ``requires_grad`` flags and the modules' modes, then propagates.

The signals (:func:`distillation_loss`, :func:`student_rows`) are here too: KL of next-token
distributions through a causal LM's output embedding (temperature configurable), else the relative
squared error to the dense model's outputs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .planning.inputs import Batch, ForwardFn, flat_output_grad, run_model
from .planning.layerwise import _Stop

TRAINABLE = ("sites", "skip", "adapters", "all")
# Modules of a compressed site that hold fitted maps: the skip (PARTIAL / LINEAR, factored or not),
# the down projection fitted jointly with it, the merged Linear.
_FITTED = ("skip_in", "skip", "down_proj", "fc2", "fc")


@dataclass
class HealResult:
    """What :func:`heal` did: steps run, held-out loss before / best / after, where the best was."""

    steps: int  # optimizer steps run (fewer than asked when a non-finite loss stopped the run)
    heldout_before: float
    heldout_best: float
    heldout_after: float  # the model as healing leaves it (the best checkpoint restored)
    best_step: int  # 0: nothing beat the start and the model is exactly as it was
    seconds: float
    trainable: str
    n_trainable: int  # trainable elements (adapter elements for "adapters")
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    note: str = ""


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of ``steps``: linear warm-up
    over the first ``warmup`` steps (``(step + 1) / warmup``), then cosine decay from 1 toward 0
    (``0.5 * (1 + cos(pi * (step - warmup) / (steps - warmup)))``; the last step is just above 0)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def default_warmup(steps: int) -> int:
    """10% of the steps, at least 1."""
    return max(1, round(0.1 * steps))


def default_eval_every(steps: int) -> int:
    """Eight held-out evaluations over the run (plus the one before)."""
    return max(steps // 8, 1)


# ---------------------------------------------------------------------------------------------
# The signals
# ---------------------------------------------------------------------------------------------

def student_rows(model: nn.Module, b: Batch, k: int, head: nn.Module | None, forward_fn: ForwardFn | None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's output rows at the measurement point (the input of ``head``, the output embedding,
    when given: no logits computed; else the model's outputs), with the graph."""
    if head is None:
        return flat_output_grad(run_model(model, b, k, forward_fn), b, dtype)
    got: list[torch.Tensor] = []

    def pre(mod, args):
        got.append(args[0])
        raise _Stop

    handle = head.register_forward_pre_hook(pre)
    try:
        run_model(model, b, k, forward_fn)
    except _Stop:
        pass
    finally:
        handle.remove()
    return b.rows(got[0]).to(dtype)


def _head_logits(h: torch.Tensor, head: nn.Module) -> torch.Tensor:
    w = head.weight.detach().to(torch.float32)
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().to(torch.float32)
    return F.linear(h, w, bias)


def distillation_loss(model: nn.Module, b: Batch, k: int, teacher: torch.Tensor, head: nn.Module | None,
                      forward_fn: ForwardFn | None, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions through the frozen output embedding
    ``head`` (``teacher``: the dense model's final hidden states on ``b``), at ``temperature``
    (scaled by ``temperature**2`` so the gradient's size does not depend on it); the relative squared
    error ``||y - t||^2 / ||t||^2`` when there is no output embedding."""
    h = student_rows(model, b, k, head, forward_fn)
    if head is None:
        t = teacher.to(h.dtype)
        return (h - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
    with torch.no_grad():
        log_t = torch.log_softmax(_head_logits(teacher.to(torch.float32), head) / temperature, dim=-1)
    log_s = torch.log_softmax(_head_logits(h, head) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature ** 2


def user_loss(heal_loss: Callable, model: nn.Module, b: Batch, step: int | None = None) -> torch.Tensor:
    """``heal_loss(model, batch)`` (``batch``: what the user passed), checked to be a scalar tensor
    (with a graph to the trainable weights when grad is enabled)."""
    loss = heal_loss(model, b.raw)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or (torch.is_grad_enabled() and not loss.requires_grad):
        where = "" if step is None else f" (healing step {step})"
        raise TypeError(f"heal_loss(model, batch) must return a scalar tensor with a graph to the model's weights"
                        f"{where}, got {type(loss).__name__} "
                        f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
                        "; return e.g. F.cross_entropy(model(x), y), not a float or a detached tensor")
    return loss.reshape(())


# ---------------------------------------------------------------------------------------------
# The trainable set
# ---------------------------------------------------------------------------------------------

def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _fitted_linears(site: nn.Module) -> list[nn.Linear]:
    """The Linears of a compressed site that hold fitted maps (see ``_FITTED``); for an LCChain each
    skip and the Linear fitted with it, else its last Linear."""
    mods = site._modules
    out = [mods[n] for n in _FITTED if isinstance(mods.get(n), nn.Linear)]
    skips, linears = mods.get("skips"), mods.get("linears")
    if skips is not None and linears is not None:
        for key, s in skips.items():
            out += [s, linears[int(key) + 1]]
    if not out and linears is not None and len(linears):
        out = [linears[-1]]
    return _unique(out)


def site_linears(model: nn.Module, sites: list[str]) -> list[nn.Linear]:
    """Every Linear inside the compressed sites (the modules adapters attach to)."""
    return _unique(m for p in sites for m in model.get_submodule(p).modules() if isinstance(m, nn.Linear))


def trainable_parameters(model: nn.Module, sites: list[str], trainable: str) -> list[nn.Parameter]:
    """The parameters healing trains for ``trainable`` (not ``"adapters"``: those are created by
    :func:`heal`). Slopes (``alpha``) are never trained: they define which form a site has."""
    if trainable == "all":
        return _unique(p for n, p in model.named_parameters() if not n.endswith("alpha"))
    if trainable == "sites":
        return _unique(p for s in sites for n, p in model.get_submodule(s).named_parameters()
                       if not n.endswith("alpha"))
    if trainable == "skip":
        return _unique(p for s in sites for lin in _fitted_linears(model.get_submodule(s)) for p in lin.parameters())
    raise ValueError(f"heal_trainable must be one of {TRAINABLE}, got {trainable!r}")


class LowRankDelta(nn.Module):
    """A LoRA adapter as a parametrization of a Linear's weight: ``W + B @ A`` (``B`` starts at 0, so
    the weight is unchanged until it trains). Code that reads ``linear.weight`` (the package's fused
    forwards do) sees the adapted weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, like: torch.Tensor, seed: int):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        a = torch.randn(rank, in_features, generator=g) / math.sqrt(in_features)
        self.A = nn.Parameter(a.to(like.device, like.dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.B @ self.A


def _attach_adapters(linears: list[nn.Linear], rank: int) -> list[nn.Parameter]:
    params = []
    for i, lin in enumerate(linears):
        w = lin.weight
        r = min(rank, *w.shape)
        delta = LowRankDelta(w.shape[0], w.shape[1], r, w, seed=i)
        parametrize.register_parametrization(lin, "weight", delta)
        params += [delta.A, delta.B]
    return params


def _detach_adapters(linears: list[nn.Linear], merge: bool) -> None:
    """Remove the adapters; ``merge`` writes ``W + B A`` into the original weight tensor (the same
    Parameter object), else the weight is exactly what it was."""
    for lin in linears:
        if parametrize.is_parametrized(lin, "weight"):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=merge)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def progress_bar(total: int, on: bool, desc: str):
    """A tqdm bar when asked for and tqdm is installed, else None."""
    if on:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False)
        except ImportError:
            pass
    return None


def heal(
    model: nn.Module,
    loss: Callable[[nn.Module, int], torch.Tensor],
    n_batches: int,
    evaluate: Callable[[nn.Module], float],
    *,
    sites: list[str],
    steps: int,
    lr: float,
    trainable: str = "sites",
    rank: int = 16,
    warmup: int | None = None,
    clip: float | None = 1.0,
    eval_every: int | None = None,
    progress: bool = True,
    note: str = "",
) -> HealResult:
    """Train ``model`` for ``steps`` optimizer steps on ``loss(model, k)`` (``k = step % n_batches``,
    the training batch), keep the checkpoint with the lowest ``evaluate(model)`` (the held-out loss,
    measured without a graph) and leave the model at it. See the module docstring for the schedule,
    the trainable sets and the guarantees. ``sites``: paths of the compressed sites."""
    if trainable not in TRAINABLE:
        raise ValueError(f"heal_trainable must be one of {TRAINABLE}, got {trainable!r}")
    warmup = default_warmup(steps) if warmup is None else warmup
    eval_every = default_eval_every(steps) if eval_every is None else eval_every
    t0 = time.perf_counter()
    flags = [(p, p.requires_grad) for p in _unique(model.parameters())]
    modes = [(m, m.training) for m in model.modules()]
    adapted: list[nn.Linear] = []
    params: list[nn.Parameter] = []
    initial: list[torch.Tensor] = []
    bar = progress_bar(steps, progress, "heal")
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if trainable == "adapters":
            adapted = site_linears(model, sites)
            params = _attach_adapters(adapted, rank)
        else:
            params = trainable_parameters(model, sites, trainable)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        n_trainable = sum(p.numel() for p in params)
        if not params:
            raise ValueError(f"heal_trainable={trainable!r} selects no parameter in the compressed sites "
                             f"{sites[:4]}; use heal_trainable='sites'")
        model.eval()  # dropout off, BatchNorm on its running statistics: the function being distilled
        initial = [p.detach().to("cpu", copy=True) for p in params]
        best, best_step = initial, 0
        before = float(evaluate(model))
        if not math.isfinite(before):
            raise ValueError(f"the held-out loss before healing is {before}: the compressed model's outputs are "
                             "not finite; check the model and calib")
        best_value, history, done, last_eval = before, [(0, before)], 0, 0
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
        for step in range(steps):
            with torch.enable_grad():
                value = loss(model, step % n_batches)
            if not torch.isfinite(value):
                note = _join(note, f"stopped at step {step + 1}: the training loss is {float(value)} (lower heal_lr, "
                                   f"now {lr:g})")
                break
            opt.zero_grad(set_to_none=True)
            value.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
            if not torch.isfinite(norm):
                note = _join(note, f"stopped at step {step + 1}: non-finite gradients (lower heal_lr, now {lr:g})")
                break
            opt.step()
            sched.step()
            done = step + 1
            if done % eval_every == 0 or done == steps:
                v = float(evaluate(model))
                history.append((done, v))
                last_eval = done
                if v < best_value:  # NaN never compares lower: a diverged run keeps the earlier best
                    best_value, best_step = v, done
                    best = [p.detach().to("cpu", copy=True) for p in params]
                if bar is not None:
                    bar.set_postfix(heldout=f"{v:.4g}", best=f"{best_value:.4g}")
            if bar is not None:
                bar.update(1)
        del opt, sched
        if best_step != last_eval or done != last_eval:  # the model is not at its best checkpoint: put it back
            _load(params, best)
        for p in params:
            p.grad = None
        if trainable == "adapters":
            _detach_adapters(adapted, merge=best_step > 0)
            adapted = []
        if best_step == 0:
            after = before  # exactly the starting weights
        elif trainable == "adapters":
            after = float(evaluate(model))  # merged: W + B A rounded once into W
        else:
            after = best_value
        return HealResult(done, before, best_value, after, best_step, time.perf_counter() - t0, trainable,
                          n_trainable, history, note)
    except BaseException:
        if initial:
            _load(params, initial)
        for p in params:
            p.grad = None
        if adapted:
            _detach_adapters(adapted, merge=False)
        raise
    finally:
        if bar is not None:
            bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _load(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b
