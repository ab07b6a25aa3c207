"""What a plan is: per-site decisions with their cost and error, as dataclasses, JSON and a table.

Joints between Linears are MERGE (multiply the maps into one Linear), FACTOR (keep both Linears,
drop the activation), KEEP (nonlinear), or PARTIAL (the linear channels fold into a skip Linear,
the others stay an MLP).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

MERGE, FACTOR, KEEP, PARTIAL, LINEAR = "MERGE", "FACTOR", "KEEP", "PARTIAL", "LINEAR"
DECISIONS = (MERGE, FACTOR, KEEP, PARTIAL)
GATED_DECISIONS = (KEEP, PARTIAL, LINEAR)  # a gated FFN has no merge: its linear form is fitted
OBJECTIVES = ("flops", "params", "latency")
PLAN_FORMAT = 1


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

    @property
    def decision(self) -> str:
        ds = [j.decision for j in self.joints]
        return ds[0] if len(ds) == 1 else "/".join(ds)

    @property
    def changes(self) -> bool:
        return any(j.decision != KEEP for j in self.joints)


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
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a CollapsePlan (format {got!r}, expected {PLAN_FORMAT}); was it written by to_json()?")
        try:
            sites = [SitePlan(**{**s, "joints": [JointPlan(**j) for j in s["joints"]]}) for s in d["sites"]]
            rest = {k: v for k, v in d.items() if k not in ("format", "sites", "fitted")}
            return cls(sites=sites, **rest)
        except (KeyError, TypeError) as e:
            raise ValueError(f"corrupt CollapsePlan: {e}") from e

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
        return "\n".join(lines)


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
