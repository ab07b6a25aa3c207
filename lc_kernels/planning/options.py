"""The planning options, validated once at the public boundary (``plan_collapse``, ``collapse_``,
the CLI and ``compress`` all pass through :meth:`PlanOptions.of`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .allocate import ALLOCATIONS
from .plan import OBJECTIVES

SEARCHES = ("auto", "exhaustive", "greedy")


def check_number(name: str, v: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, what: str = "") -> float:
    """``v`` as a float if it is a finite real number in range, else a ValueError naming ``name``."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number{what}, got {v!r}")
    v = float(v)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}{what}, got {v!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high:g}{what}, got {v!r}")
    return v


# How a fitted plan ranks the channels a PARTIAL joint folds into its skip: "activation" (what a
# linear map of the joint's input leaves unexplained of each channel, times its outgoing weight
# norm) or "sensitivity" (that remainder weighted per token by the gradient of random projections
# of the model output: how much the output moves; needs one backward pass per probe on a sample).
SELECTS = ("activation", "sensitivity")


@dataclass(frozen=True)
class PlanOptions:
    tol: float = 0.05
    calib: object = None
    max_error: float | None = None
    target: float | None = None
    force: bool = False
    objective: str = "flops"
    search: str = "auto"
    fit: bool | str | None = None
    forward_fn: object = None
    round_to: int = 8
    tokens: int | None = None  # objective="latency": rows each site sees per call
    select: str = "activation"  # how PARTIAL channels are ranked: see SELECTS
    allocation: str | None = None  # how widths are spread over gated sites: see allocate.ALLOCATIONS
    allocation_evals: int | None = None  # search moves measured after the named proposals

    @property
    def fitted(self) -> bool:
        """Replacements are fitted whenever calibration data is given, unless ``fit=False``."""
        return self.calib is not None and self.fit is not False

    @property
    def fit_target(self) -> str:
        """What a fitted replacement reproduces: ``"global"`` (the dense model's stream after the site)
        or ``"local"`` (its site's own dense function on the inputs it now sees). Sites planned by
        :func:`~lc_kernels.planning.gated.plan_partial` with ``fit=None`` measure both on held-out
        calibration rows and keep the better; the older classic path defaults to global."""
        return "local" if self.fit == "local" else "global"

    @property
    def budget(self) -> bool:
        return self.max_error is not None or self.target is not None

    @classmethod
    def of(cls, *, tol: float = 0.05, calib: object = None, max_error: float | None = None,
           target: float | None = None, force: bool = False, objective: str = "flops",
           search: str = "auto", fit: bool | str | None = None, forward_fn: object = None,
           round_to: int = 8, example: object = None, tokens: int | None = None,
           select: str = "activation", allocation: str | None = None,
           allocation_evals: int | None = None) -> "PlanOptions":
        """Check every option once; errors name the option, what arrived and what is expected."""
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"tol must be a finite number >= 0 (max |1 - alpha| to collapse), got {tol!r}")
        tol = float(tol)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if not isinstance(force, bool):
            raise TypeError(f"force must be True or False, got {force!r}")
        if max_error is not None and check_number("max_error", max_error) < 0:
            raise ValueError(f"max_error bounds ||dy|| / ||y|| and must be >= 0, got {max_error!r}")
        if target is not None and not 0 < check_number("target", target) <= 1:
            raise ValueError(f"target is the fraction of collapsible {objective} to remove, in (0, 1]; got {target!r}")
        max_error = None if max_error is None else float(max_error)
        target = None if target is None else float(target)
        if not any(fit is v for v in (None, True, False)) and fit not in ("local", "global"):
            raise TypeError(f"fit must be None (fit when calib is given), True, False, 'local' or 'global', got "
                            f"{fit!r}")
        if (fit is True or fit in ("local", "global")) and calib is None:
            raise ValueError("fit=True fits replacements to calibration data: pass calib= (inputs the model's forward "
                             "takes), or fit=None / fit=False")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be a function forward_fn(model, batch), got {type(forward_fn).__name__}")
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise ValueError(f"round_to must be a positive int (kept PARTIAL widths are its multiples), got "
                             f"{round_to!r}")
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
            raise ValueError(f"tokens must be a positive int (rows per call to time the forms at), got {tokens!r}")
        if objective == "latency":
            if tokens is None and example is None:
                raise ValueError("objective='latency' times every candidate form at the token count you will serve: "
                                 "pass example= (an input the model takes) or tokens=N")
            tokens = tokens if tokens is not None else tokens_of(example)
        elif tokens is not None or example is not None:
            raise ValueError(f"example= and tokens= set the token count of objective='latency'; objective is "
                             f"{objective!r}")
        if select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS} (how the channels a PARTIAL site folds are ranked), "
                             f"got {select!r}")
        if allocation is not None and allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be None (compare the named assignments on held-out calibration rows, "
                             f"then search) or one of {ALLOCATIONS}, got {allocation!r}")
        if allocation_evals is not None and (not isinstance(allocation_evals, int) or isinstance(allocation_evals, bool)
                                             or allocation_evals < 0):
            raise ValueError(f"allocation_evals must be an int >= 0 (search moves measured on held-out rows), got "
                             f"{allocation_evals!r}")
        opts = cls(tol, calib, max_error, target, force, objective, search, fit, forward_fn, round_to, tokens, select,
                   allocation, allocation_evals)
        if opts.budget and calib is None:
            raise ValueError("max_error and target are measured on calibration data: pass calib= (a batch of "
                             "typical inputs, an (input, target) tuple or a DataLoader)")
        if opts.budget and force:
            raise ValueError("force=True collapses every joint, a budget chooses which: pass one of them")
        return opts


def tokens_of(example: object) -> int:
    """Rows a site sees for ``example``: leading dims of a tensor, ``batch x sequence`` of token ids."""
    if isinstance(example, dict):
        ids = example.get("input_ids", example.get("inputs_embeds"))
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            return int(ids.shape[0] * ids.shape[1])
        example = next((v for v in example.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(example, (tuple, list)) and example:
        example = example[0]
    if isinstance(example, torch.Tensor) and example.dim() >= 1 and example.numel():
        if example.is_floating_point():
            return max(1, example.numel() // example.shape[-1]) if example.dim() > 1 else 1
        return int(example.numel())  # token ids
    raise TypeError(f"example must be an input the model takes (a tensor, a tuple, or a dict with input_ids), got "
                    f"{type(example).__name__}")
