"""What a plan is: per-site decisions with their cost and error, as dataclasses, JSON and a table.

Joints between Linears are MERGE (multiply the maps into one Linear), FACTOR (keep both Linears,
drop the activation), KEEP (nonlinear), or PARTIAL (the linear channels fold into a skip Linear,
the others stay an MLP).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import MISSING as _MISSING
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator

import torch

MERGE, FACTOR, KEEP, PARTIAL, LINEAR = "MERGE", "FACTOR", "KEEP", "PARTIAL", "LINEAR"
DECISIONS = (MERGE, FACTOR, KEEP, PARTIAL)
GATED_DECISIONS = (KEEP, PARTIAL, LINEAR)  # a gated FFN has no merge: its linear form is fitted
OBJECTIVES = ("flops", "params", "latency")
FIT_TARGETS = ("local", "global")
PLAN_FORMAT = 1


@dataclass
class FittedSite:
    """What a fitted plan carries for one site (not JSON): its fitted blocks, the version of the
    site's weights they were fitted to, and the sites fitted together with it (each on the inputs
    the others' replacements produce)."""

    blocks: list
    versions: tuple
    together: tuple


def weights_version(m) -> tuple:
    """A fingerprint of the values of every parameter and buffer of ``m`` (shape, sum, sum of
    squares and a weighted sum, in float64): equal for a copy, different once a weight is changed."""
    out = []
    for t in list(m.parameters()) + list(m.buffers()):
        v = t.detach().reshape(-1).to(torch.float64)
        ramp = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
        out.append((tuple(t.shape), float(v.sum()), float(v.pow(2).sum()), float((v * ramp).sum())))
    return tuple(out)


@dataclass
class JointPlan:
    """One activation between two Linears: its slopes and what happens to it."""

    alpha: list[float]
    decision: str
    reason: str
    linear_channels: list[int] | None = None  # PARTIAL: channels folded into the skip

    @property
    def deviation(self) -> float:
        """max |1 - alpha| over the joint's channels (the no-data error proxy)."""
        return max(abs(1.0 - a) for a in self.alpha)

    def validate(self, at: str, width: int, kind: str) -> None:
        """Types and ranges of this joint of ``width`` channels (see :meth:`CollapsePlan.validate`)."""
        alpha = _list(f"{at}.alpha", self.alpha)
        if len(alpha) not in (1, width):
            raise ValueError(f"{at}.alpha has {len(alpha)} slopes; a joint of {width} channels has 1 (one per layer) "
                             f"or {width} (one per channel)")
        for c, a in enumerate(alpha):
            _number(f"{at}.alpha[{c}]", a)
        decisions = GATED_DECISIONS if kind == "LCGatedMLP" else DECISIONS
        if not isinstance(self.decision, str) or self.decision not in decisions:
            raise ValueError(f"{at}: unknown decision {self.decision!r:.60} for a {kind} site; expected one of "
                             f"{decisions}")
        _str(f"{at}.reason", self.reason)
        ch = self.linear_channels
        if ch is None and self.decision != PARTIAL:
            return
        need = (f"PARTIAL needs a strict, non-empty subset of the {width} channels as distinct ints in [0, {width})"
                if self.decision == PARTIAL else f"linear_channels are distinct ints in [0, {width})")
        if ch is None:
            raise ValueError(f"{at}.linear_channels is null: {need} (the channels folded into the skip Linear); "
                             "list them, or decide KEEP or MERGE")
        if not isinstance(ch, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in ch):
            raise TypeError(f"{at}.linear_channels: {need}, got {type(ch).__name__} {ch!r:.60}")
        if not all(0 <= c < width for c in ch) or len(set(ch)) != len(ch) or (
                self.decision == PARTIAL and not 0 < len(ch) < width):
            raise ValueError(f"{at}.linear_channels: {need}, got {ch!r:.80}"
                             + (" (all of them is MERGE, none is KEEP)" if self.decision == PARTIAL else ""))


@dataclass
class SitePlan:
    """The plan for one site (an LCFusedMLP or an LCChain)."""

    path: str
    kind: str
    widths: list[int]
    joints: list[JointPlan]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    est_error: float | None = None
    error_source: str = "|1-alpha| proxy"
    fit_ridge: float | None = None  # gated sites: the absolute ridge of the site's fit (chosen on held-out rows)

    @property
    def decision(self) -> str:
        ds = [j.decision for j in self.joints]
        return ds[0] if len(ds) == 1 else "/".join(ds)

    @property
    def changes(self) -> bool:
        return any(j.decision != KEEP for j in self.joints)

    def validate(self, at: str = "site") -> None:
        """Types and ranges of this site and its joints (see :meth:`CollapsePlan.validate`)."""
        _str(f"{at}.path", self.path)
        _str(f"{at}.kind", self.kind)
        widths = _list(f"{at}.widths", self.widths)
        for i, w in enumerate(widths):
            _int(f"{at}.widths[{i}]", w, low=1)
        joints = _list(f"{at}.joints", self.joints)
        if len(widths) < 3 or len(joints) != len(widths) - 2:
            raise ValueError(f"{at} has widths {widths} and {len(joints)} joints; a site of n Linears has n + 1 widths "
                             "and n - 1 joints (at least one)")
        for i, j in enumerate(joints):
            if not isinstance(j, JointPlan):
                raise TypeError(f"{at}.joints[{i}] must be a JointPlan, got {type(j).__name__}")
            j.validate(f"{at}.joints[{i}]", widths[i + 1], self.kind)
        for name in ("params_before", "params_after", "flops_before", "flops_after"):
            _number(f"{at}.{name}", getattr(self, name), low=0.0)
        if self.est_error is not None:
            _number(f"{at}.est_error", self.est_error, low=0.0, finite=False)
        _str(f"{at}.error_source", self.error_source)


@dataclass
class CollapsePlan:
    """Per-site decisions with their cost and estimated error. ``print(plan)`` shows a table."""

    sites: list[SitePlan]
    tol: float
    objective: str = "flops"
    forced: bool = False
    max_error: float | None = None
    target: float | None = None
    notes: list[str] = field(default_factory=list)
    measured_error: float | None = None  # ||dy|| / ||y|| at the model output, all sites collapsed together
    calib_rows: int | None = None
    search: str | None = None  # "exhaustive" or "greedy" when a budget decided
    fit: bool = False  # replacements fitted to calibration data: collapse_ needs the same calib
    round_to: int = 8  # kept PARTIAL widths are multiples of this (data-chosen channels)
    fit_target: str | None = None  # gated sites: "local" or "global" (see planning/gated.py)
    # Fitted replacement modules by site path (gated sites): collapse_ installs them without calib.
    # Not part of the JSON; they travel with save_collapsed / save_pretrained.
    fitted: dict = field(default_factory=dict, repr=False, compare=False)
    # The width assignments compared on held-out calibration rows (gated sites with a target): each
    # {"name", "kept" (per site), "flops_removed", "error" (mean KL per token, or ||dy|| / ||y||)}, in
    # the order measured; the plan holds the one with the least error.
    allocation: list = field(default_factory=list)
    # Gated sites: "dense" (each site fitted on the dense model's inputs) or "sequential" (on the
    # inputs the replacements before it produce), on the fit rows only (the held-out 1/8 excluded);
    # None for plans that fitted on every row, channels ranked on the rows each site saw.
    fit_inputs: str | None = None

    def __iter__(self) -> Iterator[SitePlan]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, key: int | str | slice) -> SitePlan | list[SitePlan]:
        """``plan[0]``, ``plan[-1]`` (position), ``plan["blocks.0.mlp"]`` (site path), ``plan[1:]`` (a list)."""
        if isinstance(key, str):
            for s in self.sites:
                if s.path == key:
                    return s
            raise KeyError(f"no site {key!r} in this plan; sites: {[s.path for s in self.sites]}")
        if isinstance(key, slice):
            return self.sites[key]
        numpy_int = type(key).__module__ == "numpy" and hasattr(key, "__index__")
        if (isinstance(key, int) and not isinstance(key, bool)) or numpy_int:
            i, n = int(key.__index__()), len(self.sites)
            if not -n <= i < n:
                valid = f"valid: {-n}..{n - 1}, or a path of {[s.path for s in self.sites]}" if n else "it is empty"
                raise IndexError(f"site index {i} is out of range for a plan of {n} sites ({valid})")
            return self.sites[i]
        raise TypeError(f"a CollapsePlan is indexed by site position (int), site path (str) or a slice, "
                        f"got {type(key).__name__} {key!r}")

    @property
    def flops_before(self) -> int:
        return sum(s.flops_before for s in self.sites)

    @property
    def flops_after(self) -> int:
        return sum(s.flops_after for s in self.sites)

    @property
    def params_before(self) -> int:
        return sum(s.params_before for s in self.sites)

    @property
    def params_after(self) -> int:
        return sum(s.params_after for s in self.sites)

    def joint_counts(self) -> tuple[int, int]:
        """(joints made linear, all joints)."""
        joints = [j for s in self.sites for j in s.joints]
        return sum(j.decision in (MERGE, FACTOR, LINEAR) for j in joints), len(joints)

    def to_dict(self) -> dict:
        fitted, self.fitted = self.fitted, {}
        try:
            return {"format": PLAN_FORMAT, **asdict(self)}
        finally:
            self.fitted = fitted

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "CollapsePlan":
        """The plan ``to_dict`` wrote; anything else (an edited or truncated file) is a ValueError naming
        the field that is wrong, what it holds and what was expected."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a CollapsePlan (format {got!r}, expected {PLAN_FORMAT}); was it written by to_json()?")
        try:
            _keys("plan", d, cls, ("format", "fitted"))
            sites = _list("plan.sites", d["sites"])
            built = []
            for i, s in enumerate(sites):
                _keys(f"plan.sites[{i}]", s, SitePlan)
                joints = []
                for k, j in enumerate(_list(f"plan.sites[{i}].joints", s["joints"])):
                    _keys(f"plan.sites[{i}].joints[{k}]", j, JointPlan)
                    joints.append(JointPlan(**j))
                built.append(SitePlan(**{**s, "joints": joints}))
            plan = cls(sites=built, **{k: v for k, v in d.items() if k not in ("format", "sites", "fitted")})
            plan.validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt CollapsePlan: {e}. Was it edited by hand? Fix that field, or make a new plan "
                             "with lc_kernels.plan_collapse") from None
        return plan

    def validate(self) -> None:
        """Refuse a plan whose fields do not hold what the planner writes (TypeError: wrong type,
        ValueError: wrong value), naming the field: an edited plan fails here, not deep inside collapse_."""
        _number("plan.tol", self.tol, low=0.0)
        _choice("plan.objective", self.objective, OBJECTIVES)
        _flag("plan.forced", self.forced)
        _flag("plan.fit", self.fit)
        if self.max_error is not None:
            _number("plan.max_error", self.max_error, low=0.0)
        if self.target is not None:
            _number("plan.target", self.target, low=0.0, high=1.0)
        if self.measured_error is not None:
            _number("plan.measured_error", self.measured_error, low=0.0, finite=False)
        if self.calib_rows is not None:
            _int("plan.calib_rows", self.calib_rows, low=0)
        _int("plan.round_to", self.round_to, low=1)
        if self.search is not None:
            _str("plan.search", self.search)
        if self.fit_target is not None:
            _choice("plan.fit_target", self.fit_target, FIT_TARGETS)
        for i, n in enumerate(_list("plan.notes", self.notes)):
            _str(f"plan.notes[{i}]", n)
        for i, a in enumerate(_list("plan.allocation", self.allocation)):
            if not isinstance(a, dict) or set(a) != {"name", "kept", "flops_removed", "error"}:
                raise ValueError(f"plan.allocation[{i}] must be a dict with name, kept, flops_removed and error, got "
                                 f"{a!r}")
        if not isinstance(self.fitted, dict):
            raise TypeError(f"plan.fitted must be a dict of site path -> fitted module, got "
                            f"{type(self.fitted).__name__}")
        paths = []
        for i, sp in enumerate(_list("plan.sites", self.sites)):
            if not isinstance(sp, SitePlan):
                raise TypeError(f"plan.sites[{i}] must be a SitePlan, got {type(sp).__name__}")
            sp.validate(f"plan.sites[{i}]")
            paths.append(sp.path)
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"the plan lists site(s) {twice} more than once; a plan holds each site once")

    @classmethod
    def from_json(cls, s: str) -> "CollapsePlan":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"CollapsePlan JSON does not parse: {e}") from e
        return cls.from_dict(d)

    def __str__(self) -> str:
        head = ("site", "alpha", "decision", "params", "FLOPs/token", "est. error", "reason")
        rows = []
        for s in self.sites:
            alphas = ", ".join(_fmt_alpha(j) for j in s.joints)
            err = "-" if s.est_error is None else f"{s.est_error:.2e}"
            reasons = _fmt_reasons(s.joints)
            rows.append((s.path, alphas, s.decision, f"{_si(s.params_before)} -> {_si(s.params_after)}",
                         f"{_si(s.flops_before)} -> {_si(s.flops_after)}", err, reasons))
        lin, total = self.joint_counts()
        ratio = self.flops_before / max(self.flops_after, 1)
        measured = "" if self.measured_error is None else f"{self.measured_error:.2e} (model)"
        rows.append(("TOTAL", "", f"{lin}/{total} linear", f"{_si(self.params_before)} -> {_si(self.params_after)}",
                     f"{_si(self.flops_before)} -> {_si(self.flops_after)}", measured, f"{ratio:.2f}x fewer FLOPs"))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        lines = [f"CollapsePlan(tol={self.tol}, objective={self.objective}"
                 + (f", max_error={self.max_error}" if self.max_error is not None else "")
                 + (f", target={self.target}" if self.target is not None else "")
                 + (f", search={self.search}" if self.search is not None else "")
                 + (", fit=least-squares" if self.fit else "") + ")",
                 fmt(head), sep, *map(fmt, rows[:-1]), sep, fmt(rows[-1]), *self.notes]
        if self.allocation:
            best = min(self.allocation, key=lambda a: a["error"])
            lines.append("allocations measured on held-out calibration rows (error, FLOPs removed, kept widths):")
            for a in self.allocation:
                lines.append(f"  {'*' if a is best else ' '} {a['name']:<12} {a['error']:.4g}  "
                             f"{a['flops_removed']:.1%}  {_widths(a['kept'])}")
        return "\n".join(lines)


def _widths(kept: list[int]) -> str:
    """Kept widths per site, runs compressed: ``1536 x3, 576 x2, 0``."""
    out, k = [], 0
    while k < len(kept):
        j = k
        while j + 1 < len(kept) and kept[j + 1] == kept[k]:
            j += 1
        out.append(f"{kept[k]} x{j - k + 1}" if j > k else str(kept[k]))
        k = j + 1
    return ", ".join(out)


def _keys(at: str, d: object, kind: type, extra: tuple[str, ...] = ()) -> None:
    """``d`` is a dict holding every required field of the dataclass ``kind`` and no unknown one."""
    if not isinstance(d, dict):
        raise ValueError(f"{at} must be an object (dict) of {kind.__name__} fields, got {type(d).__name__} {d!r:.60}")
    names = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind) if f.default is _MISSING and f.default_factory is _MISSING}
    missing, unknown = sorted(required - set(d)), sorted(set(d) - names - set(extra))
    if missing or unknown:
        what = "; ".join(([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else []))
        raise ValueError(f"{at}: {what} ({kind.__name__} has fields {sorted(names)})")


def _list(at: str, v: object) -> list:
    if not isinstance(v, list):
        raise TypeError(f"{at} must be a list, got {type(v).__name__} {v!r:.60}")
    return v


def _str(at: str, v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{at} must be a string, got {type(v).__name__} {v!r:.60}")
    return v


def _flag(at: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{at} must be true or false, got {type(v).__name__} {v!r:.60}")
    return v


def _choice(at: str, v: object, options: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in options:
        raise ValueError(f"{at} is {v!r:.60}, expected one of {options}")
    return v


def _number(at: str, v: object, *, low: float | None = None, high: float | None = None, finite: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{at} must be a number, got {type(v).__name__} {v!r:.60}")
    if math.isnan(v) or (finite and math.isinf(v)) or (low is not None and v < low) or (high is not None and v > high):
        rng = "" if low is None and high is None else f" in [{low:g}, {'inf' if high is None else f'{high:g}'}]"
        raise ValueError(f"{at} is {v!r}, expected a {'finite ' if finite else ''}number{rng}")
    return float(v)


def _int(at: str, v: object, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{at} must be an integer, got {type(v).__name__} {v!r:.60}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{at} is {v}, expected an integer in [{low}, {'...' if high is None else high}]")
    return int(v)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= 10 * scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _fmt_reasons(joints: list[JointPlan]) -> str:
    distinct = list(dict.fromkeys(j.reason for j in joints))
    if len(distinct) == 1:
        return distinct[0]
    return "; ".join(f"j{i}: {j.reason}" for i, j in enumerate(joints))


def _fmt_alpha(j: JointPlan) -> str:
    a = j.alpha
    s = f"{a[0]:.3f}" if len(a) == 1 else f"[{min(a):.2f}..{max(a):.2f}]"
    if j.linear_channels is not None:
        s += f" {len(j.linear_channels)}/{len(a)} lin" if len(a) > 1 else f" {len(j.linear_channels)} lin"
    return s
