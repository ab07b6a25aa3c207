"""``compress``: the one call for a pretrained model — prepare, fitted plan, install the plan's fits, heal.

The plan fits every replacement once, site by site in forward order through the calibration
engine (each on the inputs the replacements before it produce; ``fit="global"`` targets the dense
model's stream after the site, so a site absorbs what those before it changed); ``collapse_``
installs those fits without fitting again. With ``heal_steps > 0`` the compressed model is then
healed: with the user's ``heal_loss`` (labels allowed), else by distilling the dense model's
outputs (its next-token distributions through the output embedding of a causal LM), the
collapsible slopes frozen; the loop, its schedule and its held-out guard live in ``healing.py``.
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
from .planning.layerwise import output_point, relative_error
from .planning.calibration import eval_no_grad
from .planning.inputs import Batch, ForwardFn, calib_batches, holdout_split
from .planning.options import check_number
from .transforms import collapse_, prepare_
from .transforms.atomic import atomic
from . import healing


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
    # Healing (heal_steps > 0): the held-out loss (heal_signal says which) before healing, at the best
    # checkpoint, and as the model is left (the best checkpoint restored); best_step 0 = nothing beat
    # the start and the sites' weights are exactly the unhealed ones.
    heldout_before: float | None = None
    heldout_best: float | None = None
    heldout_after: float | None = None
    best_step: int | None = None
    heal_seconds: float | None = None
    heal_signal: str = ""  # "KL" (next-token, temperature 1), "heal_loss" or "relative squared error"
    heal_trainable: str = ""
    heal_note: str = ""  # e.g. where the guard judged, or why the run stopped early

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
        if self.heldout_before is not None:
            lines.append(f"healing: {self.heal_steps} steps, trainable={self.heal_trainable}, "
                         f"{self.heal_seconds:.1f} s; "
                         f"held-out {self.heal_signal} before {self.heldout_before:.4g}, best {self.heldout_best:.4g} "
                         f"(step {self.best_step}), after {self.heldout_after:.4g}"
                         + (f" ({self.heal_note})" if self.heal_note else ""))
        if self.plan.allocation:
            best = min(self.plan.allocation, key=lambda a: a["error"])
            lines.append(f"widths: {best['name']} (held-out error {best['error']:.4g}), the best of "
                         f"{len(self.plan.allocation)} assignments measured on held-out calibration rows "
                         f"(print(report.plan) lists them); fits: {self.plan.fit_target}, {self.plan.fit_inputs} inputs")
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


@dataclass
class _HealData:
    """What healing needs from the dense model, gathered before anything changes: the training and
    held-out batches, the dense outputs on both (distillation), and what the guard is judged on."""

    train: list[Batch]
    val: list[Batch]
    train_teacher: list[torch.Tensor]
    val_teacher: list[torch.Tensor]
    signal: str
    note: str


def _heal_data(model: nn.Module, batches: list[Batch], reference: list[torch.Tensor], heal_data, heal_loss,
               forward_fn, head: nn.Module | None) -> _HealData:
    """Training rows: ``heal_data`` when given, else the fit part of calib. Held-out rows: the
    validation slice of calib (the last 1/8, never fitted: :func:`holdout_split`); with ``heal_loss``
    and ``heal_data`` (labels live there) the last 1/8 of ``heal_data``'s batches, held out of
    training. Needs the dense model: call before the plan is installed."""
    fit_b, val_b = holdout_split(batches, forward_fn=forward_fn)
    if heal_loss is not None and len(batches) < 2 and not isinstance(batches[0].raw, torch.Tensor):
        fit_b, val_b = batches, []  # heal_loss reads the batch as passed: only whole batches can be held out
    train = fit_b if heal_data is None else calib_batches(model, heal_data, forward_fn=forward_fn)
    note = ""
    if heal_loss is not None and heal_data is not None:
        train, val_b = holdout_split(train, forward_fn=forward_fn) if len(train) >= 2 else (train, [])
    if not val_b:
        val_b = train
        note = "judged on the training rows: too little data to hold out a slice"
    signal = "heal_loss" if heal_loss is not None else "KL" if head is not None else "relative squared error"
    train_t, val_t = [], []
    if heal_loss is None:
        known = {id(b): r for b, r in zip(batches, reference)}
        with eval_no_grad(model):
            train_t = [known[id(b)].float() if id(b) in known else _hidden_states(model, [b], forward_fn)[0]
                       for b in train]
            val_t = [known[id(b)].float() if id(b) in known else _hidden_states(model, [b], forward_fn)[0]
                     for b in val_b]
    return _HealData(train, val_b, train_t, val_t, signal, note)


def _heal(model: nn.Module, data: _HealData, sites: list[str], *, steps: int, lr: float, heal_loss, forward_fn,
          head: nn.Module | None, trainable: str, rank: int, warmup: int | None, temperature: float,
          eval_every: int | None, clip: float | None, progress: bool) -> healing.HealResult:
    """Heal the compressed ``sites`` (see :func:`lc_kernels.healing.heal`) on ``data``."""
    train, val = data.train, data.val
    if heal_loss is not None:
        def loss(m: nn.Module, k: int) -> torch.Tensor:
            return healing.user_loss(heal_loss, m, train[k], k)

        def evaluate(m: nn.Module) -> float:
            return _user_loss(m, val, heal_loss)
    else:
        def loss(m: nn.Module, k: int) -> torch.Tensor:
            return healing.distillation_loss(m, train[k], k, data.train_teacher[k], head, forward_fn, temperature)

        def evaluate(m: nn.Module) -> float:
            return _mean_kl(m, val, data.val_teacher, head, forward_fn)
    return healing.heal(model, loss, len(train), evaluate, sites=sites, steps=steps, lr=lr, trainable=trainable,
                        rank=rank, warmup=warmup, clip=clip, eval_every=eval_every, progress=progress,
                        note=data.note)


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
    heal_trainable: str = "sites",
    heal_rank: int = 16,
    heal_warmup: int | None = None,
    heal_temperature: float = 1.0,
    heal_eval_every: int | None = None,
    heal_clip: float | None = 1.0,
    fit: str | None = None,
    select: str = "activation",
    allocation: str | None = None,
    allocation_evals: int | None = None,
) -> CompressReport:
    """Compress ``model`` in place: the one call for a pretrained model.

    Runs :func:`prepare_` if the model has no collapsible sites yet, plans with replacements fitted
    to ``calib`` (``target``: the fraction of the collapsible sites' FLOPs to remove; ``max_error``:
    the bound on the model-output error ``||dy|| / ||y||`` on ``calib``, as in :func:`plan_collapse`),
    each site fitted once, in forward order, on the inputs the replacements before it produce
    (``fit="global"``, the default, fits a site to what its output must be for the dense model's
    stream after it; ``"local"`` to its own function; ``select`` ranks PARTIAL channels as in
    :func:`plan_collapse`), then installs the plan's fits
    (:func:`collapse_`, no second fit). ``calib`` and ``heal_data`` take what ``plan_collapse`` takes;
    ``forward_fn(model, batch)`` runs anything else. ``objective="latency"`` with ``example=`` (a
    serving batch) or ``tokens=`` plans on times measured on this device instead of FLOPs; ``target``
    is then a fraction of the sites' measured time (see :func:`plan_collapse`). All or nothing: a
    failure restores the model.

    Healing (``heal_steps > 0``, :mod:`lc_kernels.healing`): that many AdamW steps at peak
    ``heal_lr``, linear warm-up over ``heal_warmup`` steps (default 10%, at least 1) then cosine decay
    to 0, gradients clipped to norm ``heal_clip`` (None: no clipping). It trains on ``heal_data``
    (more unlabeled text of the same kind is what helps most), else on the fit part of ``calib``.
    The signal: ``heal_loss(model, batch) -> scalar`` when given (the user's own loss, labels allowed:
    ``batch`` is what ``heal_data`` yields, else what ``calib`` yields); else the dense model's outputs,
    recorded before compression: for a causal LM (a model with an output embedding) the KL of its
    next-token distributions at ``heal_temperature``, else the relative squared error of the outputs.
    What trains (``heal_trainable``): ``"sites"`` (default) the compressed sites' weights (kept
    channels and fitted skips; slopes frozen), ``"skip"`` only their fitted linear maps and down
    projections, ``"adapters"`` rank-``heal_rank`` LoRA adapters on the sites' Linears, merged into the
    weights at the end (usually wants a ~10x larger ``heal_lr``), ``"all"`` every weight but the slopes.
    Nothing else gets a gradient, and after ``compress`` returns no parameter holds a ``.grad``.
    The guard measures the held-out loss (KL at temperature 1, the user's loss, or the relative
    squared error) on rows neither fitted nor trained on: the last 1/8 of ``calib``'s batches (or
    rows), or with ``heal_loss`` and ``heal_data`` the last 1/8 of ``heal_data``'s batches (held out of
    training); before healing, every ``heal_eval_every`` steps (default ``heal_steps // 8``) and at the
    end. The best checkpoint is kept; when nothing beats the start the model is exactly the unhealed
    one. ``report.heldout_before / heldout_best / heldout_after / best_step / heal_seconds`` say what
    happened; with ``progress`` a bar shows the last held-out loss.
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
    heal_opts = _check_heal_options(heal_trainable, heal_rank, heal_warmup, heal_temperature, heal_eval_every,
                                    heal_clip, heal_steps)
    if fit not in (None, "local", "global"):
        raise ValueError(f"fit must be 'global' (fit each site to the dense model's stream after it, the default) "
                         f"or 'local' (to its own function), got {fit!r}")
    # Gated sites are swapped for new modules and healing trains only those: no weight of the model
    # is written in place, so the transaction need not copy the model's weights (a model's size).
    gated = any(isinstance(m, LCGatedMLP) or gated_layout(m) is not None for m in model.modules())
    with atomic(model, "compress", values=not gated or (heal_steps > 0 and heal_trainable == "all")):
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
                                model_flops=model_flops, progress=progress, select=select, heal_opts=heal_opts,
                                allocation=allocation, allocation_evals=allocation_evals)


def _compress_fitted(model: nn.Module, calib: object, *, target, max_error, heal_steps: int, heal_data, heal_lr: float,
                     forward_fn, heal_loss, fit, objective, example, tokens, prepared: list[str], model_flops: int,
                     progress: bool, select: str, heal_opts: dict | None = None, allocation: str | None = None,
                     allocation_evals: int | None = None) -> CompressReport:
    """One fitted plan, its fits installed at once, then healing (see :func:`compress`)."""
    batches = calib_batches(model, calib, forward_fn=forward_fn)
    head = output_point(model) if forward_fn is None else None
    with eval_no_grad(model):
        # the dense model's outputs on calib: the reference every error after this is measured against
        reference = _hidden_states(model, batches, forward_fn, float64=True)
    # what healing needs of the dense model (its outputs on the healing and held-out rows), now
    heal_set = _heal_data(model, batches, reference, heal_data, heal_loss, forward_fn, head) if heal_steps else None
    plan = plan_collapse(model, calib=calib, target=target, max_error=max_error, forward_fn=forward_fn,
                         objective=objective, fit=fit, example=example, tokens=tokens, select=select,
                         allocation=allocation, allocation_evals=allocation_evals)
    changing = [sp for sp in plan.sites if sp.changes]
    bar = healing.progress_bar(len(changing) + (1 if heal_steps else 0), progress, "compress")
    collapse_(model, plan)  # the plan's own fits: nothing is fitted a second time
    with eval_no_grad(model):
        err = _error_now(model, batches, forward_fn, reference)
    if bar is not None:
        bar.update(len(changing))
    steps = [SiteStep(sp.path, sp.decision, sp.params_before, sp.params_after, sp.flops_before, sp.flops_after,
                      sp.est_error, err if k == len(changing) - 1 else None) for k, sp in enumerate(changing)]
    done_heal, healed = 0, None
    if heal_steps and changing:
        healed = _heal(model, heal_set, [sp.path for sp in changing], steps=heal_steps, lr=heal_lr, heal_loss=heal_loss,
                       forward_fn=forward_fn, head=head, progress=progress, **(heal_opts or {}))
        done_heal = healed.steps
        with eval_no_grad(model):
            steps[-1].healed_error = err if healed.best_step == 0 else _error_now(model, batches, forward_fn, reference)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    final = steps[-1].healed_error if steps and steps[-1].healed_error is not None else err
    removed = plan.flops_before - plan.flops_after
    curve = [(0.0, 0.0), (removed / plan.flops_before if plan.flops_before else 0.0, final)]
    report = CompressReport(steps, plan, plan.flops_before, plan.flops_after, plan.params_before, plan.params_after,
                            final, done_heal, prepared, curve, model_flops)
    if healed is not None:
        report.heldout_before, report.heldout_best, report.heldout_after = (
            healed.heldout_before, healed.heldout_best, healed.heldout_after)
        report.best_step, report.heal_seconds = healed.best_step, healed.seconds
        report.heal_trainable = healed.trainable
        report.heal_signal, report.heal_note = heal_set.signal, healed.note
    return report


def _mean_kl(model: nn.Module, batches: list[Batch], teachers: list[torch.Tensor], head: nn.Module,
             forward_fn) -> float:
    """The held-out distillation loss, no graph: KL(dense || model) of the next-token distributions
    (temperature 1) averaged over every row of the batches; without an output embedding the relative
    squared error ``sum ||y - t||^2 / sum ||t||^2`` over all of them."""
    num = den = 0.0
    with eval_no_grad(model):
        for k, (b, t) in enumerate(zip(batches, teachers)):
            if head is None:
                y = healing.student_rows(model, b, k, None, forward_fn)
                num += float((y - t.to(y.dtype)).pow(2).sum())
                den += float(t.pow(2).sum())
            else:
                num += float(healing.distillation_loss(model, b, k, t, head, forward_fn)) * t.shape[0]
                den += t.shape[0]
    return num / max(den, 1e-30)


def _user_loss(model: nn.Module, batches: list[Batch], heal_loss) -> float:
    """Mean of the user's healing loss over the healing batches, eval mode, no graph."""
    if heal_loss is None:
        return 0.0
    with eval_no_grad(model):
        return sum(float(healing.user_loss(heal_loss, model, b)) for b in batches) / len(batches)


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


_student = healing.student_rows  # the model's output rows at the measurement point, with the graph


def _check_heal_options(trainable, rank, warmup, temperature, eval_every, clip, steps: int) -> dict:
    """The healing keywords of :func:`compress`, checked; returns them for :func:`_heal`."""
    if trainable not in healing.TRAINABLE:
        raise ValueError(f"heal_trainable must be one of {healing.TRAINABLE} (the compressed sites' weights, only "
                         f"their fitted maps, low-rank adapters on them, or every weight), got {trainable!r}")
    for name, v, low in (("heal_rank", rank, 1), ("heal_warmup", warmup, 0), ("heal_eval_every", eval_every, 1)):
        if v is None and name != "heal_rank":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            default = " or None (the default)" if name != "heal_rank" else ""
            raise ValueError(f"{name} must be an int >= {low}{default}, got {v!r}")
    if warmup is not None and steps and warmup > steps:
        raise ValueError(f"heal_warmup ({warmup}) must be at most heal_steps ({steps}); lower it or leave it None "
                         "(10% of the steps)")
    temperature = check_number("heal_temperature", temperature, low=0, low_open=True,
                               what=" (the distillation temperature; 1 = the model's own distributions)")
    if clip is not None:
        clip = check_number("heal_clip", clip, low=0, low_open=True, what=" (the gradient-norm bound), or None")
    return dict(trainable=trainable, rank=rank, warmup=warmup, temperature=temperature, eval_every=eval_every,
                clip=clip)
