"""``compress``: the one call for a pretrained model — prepare, fitted plan, collapse site by site, heal.

Sites collapse one at a time in order of least planned error; each is fitted again on the model as
it is at that moment (the sites before it already replaced, and healed), so later replacements
absorb what earlier ones changed. With ``heal_steps > 0`` the model is healed between steps by
self-distillation: the model's own outputs before compression are the teacher, no labels, the
collapsible slopes frozen. Every step's measured model-output error and FLOPs removed form the
error-versus-FLOPs curve of the report.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .integrations.gated import gated_layout
from .nn.gated import LCGatedMLP
from .nn.mlp import LCChain, LCFusedMLP
from .planning import CollapsePlan, plan_collapse
from .planning.cost import linear_flops
from .planning.gated import GatedSite, gated_sites, measure
from .planning.layerwise import _Stop, output_point
from .planning.calibration import eval_no_grad
from .planning.inputs import Batch, ForwardFn, calib_batches, flat_output, run_model
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
    model_error: float | None  # measured model-output error once this site (and those before it) collapsed
    # (gated sites are fitted and installed together: only the last step carries the model error)
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


class _Teacher:
    """The model's outputs before compression, on the calibration and healing batches."""

    def __init__(self, model: nn.Module, calib: list[Batch], heal: list[Batch], forward_fn: ForwardFn | None):
        with eval_no_grad(model):
            self.calib = [flat_output(run_model(model, b, i, forward_fn), b) for i, b in enumerate(calib)]
            self.heal = [flat_output(run_model(model, b, i, forward_fn), b) for i, b in enumerate(heal)]
        self.norm = math.sqrt(sum(float(r.pow(2).sum()) for r in self.calib))


def _error(model: nn.Module, batches: list[Batch], teacher: _Teacher, forward_fn: ForwardFn | None) -> float:
    with eval_no_grad(model):
        d2 = sum(float((flat_output(run_model(model, b, i, forward_fn), b) - t).pow(2).sum())
                 for i, (b, t) in enumerate(zip(batches, teacher.calib)))
    return math.sqrt(d2) / teacher.norm


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


def flat_output_grad(out: object, batch: Batch) -> torch.Tensor:
    """:func:`flat_output` keeping the graph (float32 is enough for a loss)."""
    if isinstance(out, torch.Tensor):
        return batch.select(out).to(torch.float32) if out.is_floating_point() else out.new_zeros(0)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    parts = [flat_output_grad(v, batch) for v in out if isinstance(v, (torch.Tensor, dict, tuple, list))] \
        if isinstance(out, (tuple, list)) else []
    parts = [p for p in parts if p.numel()]
    return torch.cat(parts) if parts else torch.zeros(0)


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
) -> CompressReport:
    """Compress ``model`` in place: the one call for a pretrained model.

    Runs :func:`prepare_` if the model has no collapsible sites yet, plans with replacements fitted
    to ``calib`` (``target``: the fraction of the collapsible sites' FLOPs to remove; ``max_error``:
    the bound on the model-output error ``||dy|| / ||y||`` on ``calib``, as in :func:`plan_collapse`),
    then collapses site by site in order of least planned error, each refitted on the model as it is
    then. ``heal_steps > 0`` spreads that many self-distillation steps (teacher: the model's own
    outputs before compression; ``heal_data`` defaults to ``calib``; Adam at ``heal_lr``) over the
    steps, after each collapse. ``calib`` and ``heal_data`` take what ``plan_collapse`` takes;
    ``forward_fn(model, batch)`` runs anything else. ``objective="latency"`` with ``example=`` (a
    serving batch) or ``tokens=`` plans on times measured on this device instead of FLOPs; ``target``
    is then a fraction of the sites' measured time (see :func:`plan_collapse`). All or nothing: a
    failure restores the model.

    ``heal_loss(model, batch) -> loss`` heals with the user's own loss (labels allowed: ``batch`` is
    what ``heal_data`` yields); without it healing distils the model's own outputs. A healing round
    that makes what it optimises worse is undone: the calibration error when distilling, the mean
    of ``heal_loss`` over ``heal_data`` with the user's loss.

    Gated FFNs (decoder LLMs: :class:`~lc_kernels.LCGatedMLP`) are planned and fitted in one
    layer-by-layer pass and installed together (the plan carries its fits; ``fit="global"``, the
    default, fits each site to the dense model's stream after its block, ``"local"`` to its own function). Their errors are taken at the final hidden state (the input
    of the output embedding), never on full-vocabulary logits; healing distils the dense model's
    next-token distribution (KL on logits, batch by batch) into the compressed sites' weights.
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
        if gated_sites(model):
            return _compress_gated(model, calib, target=target, max_error=max_error, heal_steps=heal_steps,
                                   heal_data=heal_data, heal_lr=heal_lr, forward_fn=forward_fn, heal_loss=heal_loss,
                                   fit=fit, objective=objective, prepared=prepared, model_flops=model_flops)
        if fit not in (None, "local"):
            raise ValueError(f"fit={fit!r}: Linear -> act -> Linear sites are fitted to their own function "
                             "(fit='local'); 'global' applies to gated FFN sites")
        batches = calib_batches(model, calib, forward_fn=forward_fn)
        heal = batches if heal_data is None else calib_batches(model, heal_data, forward_fn=forward_fn)
        teacher = _Teacher(model, batches, heal if heal_steps else [], forward_fn)
        plan = plan_collapse(model, calib=calib, target=target, max_error=max_error, forward_fn=forward_fn,
                             objective=objective, example=example, tokens=tokens)
        changing = sorted((sp for sp in plan.sites if sp.changes), key=lambda sp: (sp.est_error or 0.0))
        total_before = plan.flops_before
        removed, steps, curve = 0, [], [(0.0, 0.0)]
        bar = _progress(len(changing), progress, "compress")
        per_step = [heal_steps // max(len(changing), 1) + (k < heal_steps % max(len(changing), 1))
                    for k in range(len(changing))]
        done_heal = 0
        for k, sp in enumerate(changing):
            one = copy.copy(plan)
            one.sites, one.notes = [_current(model, sp)], []
            collapse_(model, one, calib=calib, forward_fn=forward_fn, force=True)
            removed += sp.flops_before - sp.flops_after
            err = _error(model, batches, teacher, forward_fn)
            step = SiteStep(sp.path, sp.decision, sp.params_before, sp.params_after, sp.flops_before, sp.flops_after,
                            sp.est_error, err)
            if per_step[k]:
                saved = {n: t.detach().clone() for n, t in model.state_dict().items()}
                user_before = _user_loss(model, heal, heal_loss)
                _heal(model, heal, teacher.heal, per_step[k], heal_lr, forward_fn, done_heal, heal_loss)
                done_heal += per_step[k]
                step.healed_error = _error(model, batches, teacher, forward_fn)
                worse = (_user_loss(model, heal, heal_loss) > user_before if heal_loss is not None
                         else step.healed_error > err)
                if worse:
                    # Healing that makes what it optimises worse (the calibration error, or the user's
                    # loss on heal_data) is undone: too high heal_lr, too little heal_data.
                    model.load_state_dict(saved)
                    step.healed_error = err
            steps.append(step)
            curve.append((removed / total_before if total_before else 0.0, step.healed_error or err))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        final = curve[-1][1]
    return CompressReport(steps, plan, total_before, plan.flops_after, plan.params_before, plan.params_after, final,
                          done_heal, prepared, curve, model_flops)


def _compress_gated(model: nn.Module, calib: object, *, target, max_error, heal_steps: int, heal_data, heal_lr: float,
                    forward_fn, heal_loss, fit, objective, prepared: list[str], model_flops: int) -> CompressReport:
    """:func:`compress` for gated FFN sites: one fitted plan, installed at once, then healing."""
    batches = calib_batches(model, calib, forward_fn=forward_fn)
    heal = batches if heal_data is None else calib_batches(model, heal_data, forward_fn=forward_fn)
    sites = [GatedSite.of(m, p) for p, m in gated_sites(model)]
    head = output_point(model) if forward_fn is None else None
    with eval_no_grad(model):
        teacher = _hidden_states(model, heal, forward_fn) if heal_steps and heal_loss is None else []
    plan = plan_collapse(model, calib=calib, target=target, max_error=max_error, forward_fn=forward_fn,
                         objective=objective, fit=fit)
    reference = None
    if heal_steps:
        with eval_no_grad(model):
            _, reference = measure(model, sites, batches, forward_fn, {})
    collapse_(model, plan)
    err = plan.measured_error
    changing = [sp for sp in plan.sites if sp.changes]
    steps = [SiteStep(sp.path, sp.decision, sp.params_before, sp.params_after, sp.flops_before, sp.flops_after,
                      sp.est_error, err if k == len(changing) - 1 else None) for k, sp in enumerate(changing)]
    done_heal = 0
    if heal_steps and changing:
        params = [p for sp in changing for n, p in model.get_submodule(sp.path).named_parameters()
                  if p.requires_grad and not n.endswith("alpha")]
        saved = {id(p): p.detach().clone() for p in params}

        def distil(m: nn.Module, b: Batch, k: int) -> torch.Tensor:
            return _distillation_loss(m, b, k, teacher[k], head, forward_fn)

        # The guard judges what the healing optimises: the user's loss on heal_data, or, distilling
        # through an output embedding, the KL to the dense model's next-token distribution on calib
        # (the hidden-state error may rise while the distributions get closer); else the error.
        kl_guard = heal_loss is None and head is not None
        calib_teacher = [r.view(-1, r.numel() // b.n_rows).float() for r, b in zip(reference, batches)] \
            if kl_guard else []
        objective = (lambda: _user_loss(model, heal, heal_loss)) if heal_loss is not None else (
            lambda: _mean_kl(model, batches, calib_teacher, head, forward_fn)) if kl_guard else None
        before = objective() if objective is not None else None
        _heal(model, heal, [], heal_steps, heal_lr, forward_fn, 0, heal_loss, params=params,
              loss_fn=None if heal_loss is not None else distil)
        done_heal = heal_steps
        with eval_no_grad(model):
            healed = _error_now(model, sites, batches, forward_fn, reference)
        if (objective() > before) if objective is not None else healed > err:
            with torch.no_grad():
                for p in params:
                    p.copy_(saved[id(p)])
            healed = err
        steps[-1].healed_error = healed
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


def _error_now(model: nn.Module, sites, batches: list[Batch], forward_fn, reference) -> float:
    """The model-output error of the model as it is now (its sites already collapsed)."""
    err, _ = measure(model, sites, batches, forward_fn, {}, reference)
    return err


def _hidden_states(model: nn.Module, batches: list[Batch], forward_fn) -> list[torch.Tensor]:
    """Per batch, the output at the measurement point (final hidden state of a causal LM), float32 rows."""
    head = output_point(model) if forward_fn is None else None
    out = []
    for k, b in enumerate(batches):
        out.append(_student(model, b, k, head, forward_fn).detach())
    return out


def _student(model: nn.Module, b: Batch, k: int, head: nn.Module | None, forward_fn) -> torch.Tensor:
    """The model's output rows at the measurement point, with the graph (no logits computed)."""
    if head is None:
        return flat_output_grad(run_model(model, b, k, forward_fn), b)
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
    return b.rows(got[0]).to(torch.float32)


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


def _current(model: nn.Module, sp):
    """``sp`` with the slopes the model holds now (healing keeps them frozen; this guards the check)."""
    sp = copy.deepcopy(sp)
    m = model.get_submodule(sp.path)
    acts = [m.act] if isinstance(m, LCFusedMLP) else list(m.acts)
    for a, j in zip(acts, sp.joints):
        if hasattr(a, "alpha"):
            j.alpha = a.alpha.detach().float().cpu().tolist()
    return sp
