"""``compress``: the one call for a pretrained model — prepare, fitted plan, install the plan's fits, heal.

The plan fits every replacement once, site by site in forward order through the calibration
engine (each on the inputs the replacements before it produce; ``fit="global"`` targets the dense
model's stream after the site, so a site absorbs what those before it changed); ``collapse_``
installs those fits without fitting again. With ``heal_steps > 0`` the compressed model is then
healed: with the user's ``heal_loss`` (labels allowed), else by distilling the dense model's
outputs (its next-token distributions through the output embedding of a causal LM), the
collapsible slopes frozen. A healing run that makes what it optimises worse is undone.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .integrations.gated import gated_layout
from .nn.gated import LCGatedMLP
from .nn.mlp import LCChain, LCFusedMLP
from .planning import CollapsePlan, plan_collapse
from .planning.cost import linear_flops
from .planning.gated import gated_sites
from .planning.layerwise import _Stop, output_point, relative_error
from .planning.calibration import eval_no_grad
from .planning.inputs import Batch, ForwardFn, calib_batches, flat_output_grad, run_model
from .planning.options import check_number
from .transforms import collapse_, prepare_
from .transforms.atomic import atomic


@dataclass
class SiteStep:
    """One site of a compression: what it became, its cost, and its errors."""

    path: str
    decision: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    planned_error: float | None  # the site's output error in the fitted plan
    model_error: float | None  # measured model-output error with the plan installed: the sites are fitted
    # once and installed together, so only the last step carries it
    healed_error: float | None = None  # the same after healing, when healing ran


@dataclass
class CompressReport:
    """What :func:`compress` did. ``print(report)`` is a table; ``report.plot(path)`` draws the curve."""

    steps: list[SiteStep]
    plan: CollapsePlan
    flops_before: int  # per token, collapsible sites
    flops_after: int
    params_before: int
    params_after: int
    final_error: float
    heal_steps: int
    prepared: list[str] = field(default_factory=list)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (fraction of site FLOPs removed, error)
    model_flops: int | None = None  # per token, every Linear of the model before compression

    @property
    def model_flops_removed(self) -> float | None:
        """The removed FLOPs as a fraction of the whole model's Linear FLOPs (attention included)."""
        return (self.flops_before - self.flops_after) / self.model_flops if self.model_flops else None

    @property
    def flops_removed(self) -> float:
        return 1 - self.flops_after / self.flops_before if self.flops_before else 0.0

    def __str__(self) -> str:
        head = ("step", "site", "decision", "params", "FLOPs/token", "planned err", "model err",
                "after heal" if self.heal_steps else "")
        rows = [(str(k + 1), s.path, s.decision, f"{s.params_before} -> {s.params_after}",
                 f"{s.flops_before} -> {s.flops_after}", "-" if s.planned_error is None else f"{s.planned_error:.2e}",
                 "-" if s.model_error is None else f"{s.model_error:.2e}", "" if s.healed_error is None else f"{s.healed_error:.2e}")
                for k, s in enumerate(self.steps)]
        rows.append(("", "TOTAL", f"{len(self.steps)} sites changed", f"{self.params_before} -> {self.params_after}",
                     f"{self.flops_before} -> {self.flops_after}", "", f"{self.final_error:.2e}",
                     f"{self.flops_removed:.1%} of the sites' FLOPs removed"
                     + (f" ({self.model_flops_removed:.1%} of the model's Linear FLOPs)" if self.model_flops else "")))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        lines = [f"CompressReport(heal_steps={self.heal_steps}, model-output error ||dy||/||y|| on calib)",
                 fmt(head), sep, *map(fmt, rows[:-1]), sep, fmt(rows[-1])]
        if self.prepared:
            lines.append(f"prepared {len(self.prepared)} sites: {', '.join(self.prepared[:6])}"
                         + (" ..." if len(self.prepared) > 6 else ""))
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Write the error-versus-FLOPs-removed curve as a PNG (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("report.plot needs matplotlib: pip install matplotlib (or lc_kernels[bench])") from e
        xs, ys = zip(*self.curve) if self.curve else ((), ())
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([100 * x for x in xs], ys, marker="o")
        ax.set_xlabel("FLOPs removed from the collapsible sites (%)")
        ax.set_ylabel("model-output error ||dy|| / ||y||")
        ax.set_title("compress: error vs FLOPs removed" + (f" (healed, {self.heal_steps} steps)" if self.heal_steps
                                                            else ""))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _progress(total: int, on: bool, desc: str):
    if on:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False)
        except ImportError:
            pass
    return None


def _heal(model: nn.Module, batches: list[Batch], targets: list[torch.Tensor], steps: int, lr: float,
          forward_fn: ForwardFn | None, first_step: int, heal_loss=None, params: list | None = None,
          loss_fn=None) -> None:
    """Healing, slopes frozen: ``heal_loss(model, batch)`` when given (labels allowed), else
    ``loss_fn(model, batch, k)`` (the gated path's distillation), else self-distillation on the
    relative squared output error to the teacher."""
    if params is None:
        params = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("alpha")]
    if not params or steps <= 0:
        return
    opt = torch.optim.Adam(params, lr=lr)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # dropout off, BatchNorm on its running statistics: the function being distilled
    try:
        for step in range(steps):
            k = (first_step + step) % len(batches)
            b, t = batches[k], targets[k] if targets else None
            with torch.enable_grad():
                if heal_loss is not None:
                    loss = heal_loss(model, b.raw)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                        raise TypeError(f"heal_loss(model, batch) must return a scalar tensor with a graph to the "
                                        f"model's weights, got {type(loss).__name__} "
                                        f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                elif loss_fn is not None:
                    loss = loss_fn(model, b, k)
                else:
                    y = flat_output_grad(run_model(model, b, k, forward_fn), b)
                    loss = (y - t.to(y.dtype)).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30).to(y.dtype)
            if not torch.isfinite(loss):
                raise ValueError(f"healing step {first_step + step}: the distillation loss is {loss.item()}; "
                                 f"lower heal_lr (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
                raise ValueError(f"healing step {first_step + step}: non-finite gradients; lower heal_lr (now {lr:g})")
            opt.step()
    finally:
        for m, training in modes:
            m.training = training
        for p in params:
            p.grad = None


def compress(
    model: nn.Module,
    calib: object,
    *,
    target: float | None = None,
    max_error: float | None = None,
    heal_steps: int = 0,
    heal_data: object = None,
    heal_lr: float = 1e-4,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
    objective: str = "flops",
    example: object = None,
    tokens: int | None = None,
    heal_loss=None,
    fit: str | None = None,
    select: str = "activation",
) -> CompressReport:
    """Compress ``model`` in place: the one call for a pretrained model.

    Runs :func:`prepare_` if the model has no collapsible sites yet, plans with replacements fitted
    to ``calib`` (``target``: the fraction of the collapsible sites' FLOPs to remove; ``max_error``:
    the bound on the model-output error ``||dy|| / ||y||`` on ``calib``, as in :func:`plan_collapse`),
    each site fitted once, in forward order, on the inputs the replacements before it produce
    (``fit="global"``, the default, fits a site to what its output must be for the dense model's
    stream after it; ``"local"`` to its own function; ``select`` ranks PARTIAL channels as in
    :func:`plan_collapse`), then installs the plan's fits
    (:func:`collapse_`, no second fit). ``heal_steps > 0`` then trains the compressed model for that
    many steps on ``heal_data`` (default ``calib``) with Adam at ``heal_lr``, the collapsible slopes
    frozen: with ``heal_loss(model, batch) -> loss`` when given (the user's own loss, labels allowed:
    ``batch`` is what ``heal_data`` yields), else by distilling the model's own outputs before
    compression. A healing run that makes what it optimises worse is undone: the user's loss (mean
    over ``heal_data``), the KL to the dense next-token distributions on ``calib`` (a causal LM), or
    else the calibration error. ``calib`` and ``heal_data`` take what ``plan_collapse`` takes;
    ``forward_fn(model, batch)`` runs anything else. ``objective="latency"`` with ``example=`` (a
    serving batch) or ``tokens=`` plans on times measured on this device instead of FLOPs; ``target``
    is then a fraction of the sites' measured time (see :func:`plan_collapse`). All or nothing: a
    failure restores the model.

    Linear -> act -> Linear sites heal every trainable weight of the model but the slopes. Gated FFNs
    (decoder LLMs: :class:`~lc_kernels.LCGatedMLP`) heal only the compressed sites' weights, and
    their errors are taken at the final hidden state (the input of the output embedding), never on
    full-vocabulary logits; healing distils the dense model's next-token distribution (KL on
    logits, batch by batch).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    if calib is None:
        raise ValueError("compress fits replacements to calibration data: pass calib (inputs the model's forward "
                         "takes: a tensor, a tuple, a dict such as a tokenizer's output, or a list / DataLoader)")
    if target is None and max_error is None:
        raise ValueError("compress needs a budget: target= (fraction of the collapsible FLOPs to remove, in (0, 1]) "
                         "or max_error= (bound on ||dy|| / ||y|| on calib)")
    if not isinstance(heal_steps, int) or isinstance(heal_steps, bool) or heal_steps < 0:
        raise ValueError(f"heal_steps must be an int >= 0, got {heal_steps!r}")
    heal_lr = check_number("heal_lr", heal_lr, low=0, low_open=True, what=" (the healing learning rate)")
    if heal_loss is not None and not callable(heal_loss):
        raise TypeError(f"heal_loss must be a function heal_loss(model, batch) -> scalar loss, got "
                        f"{type(heal_loss).__name__}")
    if fit not in (None, "local", "global"):
        raise ValueError(f"fit must be 'global' (fit each site to the dense model's stream after it, the default) "
                         f"or 'local' (to its own function), got {fit!r}")
    # Gated sites are swapped for new modules and healing trains only those: no weight of the model
    # is written in place, so the transaction need not copy the model's weights (a model's size).
    gated = any(isinstance(m, LCGatedMLP) or gated_layout(m) is not None for m in model.modules())
    with atomic(model, "compress", values=not gated):
        prepared = []
        if not any(isinstance(m, (LCFusedMLP, LCChain, LCGatedMLP)) for m in model.modules()):
            sites = prepare_(model)
            prepared = list(sites)
            if not prepared:
                why = "; ".join(f"{p or '<model>'}: {r}" for p, r in sites.skipped[:3])
                raise ValueError("compress found no Linear -> activation -> Linear or gated FFN site to collapse in "
                                 "this model" + (f" (left alone: {why})" if why else ""))
        model_flops = linear_flops(model)
        return _compress_fitted(model, calib, target=target, max_error=max_error, heal_steps=heal_steps,
                                heal_data=heal_data, heal_lr=heal_lr, forward_fn=forward_fn, heal_loss=heal_loss,
                                fit=fit, objective=objective, example=example, tokens=tokens, prepared=prepared,
                                model_flops=model_flops, progress=progress, select=select)


def _compress_fitted(model: nn.Module, calib: object, *, target, max_error, heal_steps: int, heal_data, heal_lr: float,
                     forward_fn, heal_loss, fit, objective, example, tokens, prepared: list[str], model_flops: int,
                     progress: bool, select: str) -> CompressReport:
    """One fitted plan, its fits installed at once, then healing (see :func:`compress`)."""
    batches = calib_batches(model, calib, forward_fn=forward_fn)
    heal = batches if heal_data is None else calib_batches(model, heal_data, forward_fn=forward_fn)
    gated = bool(gated_sites(model))
    head = output_point(model) if forward_fn is None else None
    with eval_no_grad(model):
        # the dense model's outputs on calib: the reference every error after this is measured against
        reference = _hidden_states(model, batches, forward_fn, float64=True)
        teacher = [] if not heal_steps or heal_loss is not None else (
            [r.float() for r in reference] if heal is batches else _hidden_states(model, heal, forward_fn))
    plan = plan_collapse(model, calib=calib, target=target, max_error=max_error, forward_fn=forward_fn,
                         objective=objective, fit=fit, example=example, tokens=tokens, select=select)
    changing = [sp for sp in plan.sites if sp.changes]
    bar = _progress(len(changing) + (1 if heal_steps else 0), progress, "compress")
    collapse_(model, plan)  # the plan's own fits: nothing is fitted a second time
    with eval_no_grad(model):
        err = _error_now(model, batches, forward_fn, reference)
    if bar is not None:
        bar.update(len(changing))
    steps = [SiteStep(sp.path, sp.decision, sp.params_before, sp.params_after, sp.flops_before, sp.flops_after,
                      sp.est_error, err if k == len(changing) - 1 else None) for k, sp in enumerate(changing)]
    done_heal = 0
    if heal_steps and changing:
        if gated:  # only the new modules train: nothing else of a large model needs a copy or a gradient
            params = [p for sp in changing for n, p in model.get_submodule(sp.path).named_parameters()
                      if p.requires_grad and not n.endswith("alpha")]
        else:
            params = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("alpha")]
        saved = {id(p): p.detach().clone() for p in params}

        def distil(m: nn.Module, b: Batch, k: int) -> torch.Tensor:
            return _distillation_loss(m, b, k, teacher[k], head, forward_fn)

        # The guard judges what the healing optimises: the user's loss on heal_data, or, distilling
        # through an output embedding, the KL to the dense model's next-token distribution on calib
        # (the hidden-state error may rise while the distributions get closer); else the error.
        kl_guard = heal_loss is None and head is not None
        calib_teacher = [r.view(-1, r.numel() // b.n_rows).float() for r, b in zip(reference, batches)] \
            if kl_guard else []
        objective_now = (lambda: _user_loss(model, heal, heal_loss)) if heal_loss is not None else (
            lambda: _mean_kl(model, batches, calib_teacher, head, forward_fn)) if kl_guard else None
        before = objective_now() if objective_now is not None else None
        _heal(model, heal, [], heal_steps, heal_lr, forward_fn, 0, heal_loss, params=params,
              loss_fn=None if heal_loss is not None else distil)
        done_heal = heal_steps
        with eval_no_grad(model):
            healed = _error_now(model, batches, forward_fn, reference)
        if (objective_now() > before) if objective_now is not None else healed > err:
            with torch.no_grad():
                for p in params:
                    p.copy_(saved[id(p)])
            healed = err
        steps[-1].healed_error = healed
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    final = steps[-1].healed_error if steps and steps[-1].healed_error is not None else err
    removed = plan.flops_before - plan.flops_after
    curve = [(0.0, 0.0), (removed / plan.flops_before if plan.flops_before else 0.0, final)]
    return CompressReport(steps, plan, plan.flops_before, plan.flops_after, plan.params_before, plan.params_after,
                          final, done_heal, prepared, curve, model_flops)


def _mean_kl(model: nn.Module, batches: list[Batch], teachers: list[torch.Tensor], head: nn.Module,
             forward_fn) -> float:
    """Mean KL(dense || model) of the next-token distributions over the batches, no graph."""
    with eval_no_grad(model):
        return sum(float(_distillation_loss(model, b, k, t, head, forward_fn))
                   for k, (b, t) in enumerate(zip(batches, teachers))) / len(batches)


def _user_loss(model: nn.Module, batches: list[Batch], heal_loss) -> float:
    """Mean of the user's healing loss over the healing batches, eval mode, no graph."""
    if heal_loss is None:
        return 0.0
    with eval_no_grad(model):
        return sum(float(heal_loss(model, b.raw)) for b in batches) / len(batches)


def _error_now(model: nn.Module, batches: list[Batch], forward_fn, reference: list[torch.Tensor]) -> float:
    """The model-output error of the model as it is now, at the same point as ``reference``."""
    return relative_error(_hidden_states(model, batches, forward_fn, float64=True), reference)


def _hidden_states(model: nn.Module, batches: list[Batch], forward_fn, float64: bool = False) -> list[torch.Tensor]:
    """Per batch, the output rows at the measurement point (final hidden state of a causal LM, else
    the model's output), float32 (float64 to measure errors with)."""
    head = output_point(model) if forward_fn is None else None
    out = []
    for k, b in enumerate(batches):
        out.append(_student(model, b, k, head, forward_fn, torch.float64 if float64 else torch.float32).detach())
    return out


def _student(model: nn.Module, b: Batch, k: int, head: nn.Module | None, forward_fn,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's output rows at the measurement point, with the graph (no logits computed)."""
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


def _distillation_loss(model: nn.Module, b: Batch, k: int, teacher: torch.Tensor, head: nn.Module | None,
                       forward_fn) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions through the (frozen) output embedding,
    batch by batch; relative squared error when the model has no output embedding."""
    h = _student(model, b, k, head, forward_fn)
    if head is None:
        return (h - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-30)
    w = head.weight.detach().to(torch.float32)
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().to(torch.float32)
    with torch.no_grad():
        p_t = torch.log_softmax(torch.nn.functional.linear(teacher, w, bias), dim=-1)
    log_s = torch.log_softmax(torch.nn.functional.linear(h, w, bias), dim=-1)
    return torch.nn.functional.kl_div(log_s, p_t, log_target=True, reduction="batchmean")
