"""``lc-kernels bench``: throughput of collapsed and fused MLPs against what users would otherwise run.

Every provider of a case is timed in the same run, on the same weights and inputs, as the
baseline (``nn.Sequential`` eager), so speedups are ratios measured under one load; beside
each speedup sits the FLOP ratio the planner's cost model predicts. The pytest-benchmark
suites in ``benchmarks/`` build their cases with the functions here.

Timing discipline: every provider's output is checked against the float64 PyTorch reference
(``ops/reference.py``) and a provider that disagrees is refused, not timed; ``torch.compile``
warm-up happens before timing; each provider gets warm-up calls, then the providers are timed
in interleaved rounds (the order reversed every other round) so that a burst of load from
another process hits all of them alike; each call takes the next of a few different input
tensors, so small shapes do not run from a warm cache; ``torch.inference_mode``; on CUDA the
device is synchronised inside the timed region. The median per call and the interquartile
range are reported.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lc_kernels import __version__
from lc_kernels.nn.mlp import LCChain, LCFusedMLP
from lc_kernels.ops import reference
from lc_kernels.planning import DECISIONS, KEEP, CollapsePlan, plan_collapse
from lc_kernels.planning.cost import decisions_cost
from lc_kernels.testing import rel_err
from lc_kernels.planning.latency import LatencyTable
from lc_kernels.speedup import plan_seconds
from lc_kernels.timing import Ratio, Timing, rotating, time_interleaved
from lc_kernels.transforms import collapse_, prepare_

BASELINE = "nn.Sequential"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Relative error ||out - ref|| / ||ref|| against the float64 reference above which a provider
# is refused (DESIGN §5). Measured on every case here (CPU, oneDNN): fp32 <= 4e-7, compiled
# included; bf16 <= 3.2e-3 for the MLPs and 8.7e-3 for the 12-block encoder. A dropped
# activation or a wrong merge gives errors of order 0.1.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


# ----------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class MLPShape:
    """A stack of Linears with GELU between them: ``widths[0] -> widths[1] -> ... -> widths[-1]``."""

    name: str
    widths: tuple[int, ...]
    tokens: int
    quick_tokens: int
    about: str

    @property
    def label(self) -> str:
        return "→".join(map(str, self.widths))


@dataclass(frozen=True)
class EncoderShape:
    """A pre-norm transformer encoder whose MLPs are ``nn.Sequential(Linear, GELU, Linear)``."""

    name: str
    dim: int
    depth: int
    heads: int
    hidden: int
    seq: int
    batch: int
    quick_batch: int
    about: str

    @property
    def label(self) -> str:
        return f"{self.depth}×({self.dim}, {self.heads} heads, MLP {self.hidden})"


SHAPES: dict[str, MLPShape | EncoderShape] = {s.name: s for s in (
    # Token counts >= 4096, where the issue states the MERGE target: ViT rows are 32 images ×
    # 197 tokens, BERT 8 × 512, GPT-2 4 × 1024.
    MLPShape("vit_tiny", (192, 768, 192), 6304, 2048, "ViT-Tiny MLP, 32 images × 197 tokens"),
    MLPShape("vit_small", (384, 1536, 384), 6304, 2048, "ViT-Small MLP, 32 images × 197 tokens"),
    MLPShape("vit_base", (768, 3072, 768), 4096, 1024, "ViT-Base / BERT-base MLP, 8 × 512 tokens"),
    MLPShape("gpt2_medium", (1024, 4096, 1024), 4096, 1024, "GPT-2 medium MLP, 4 × 1024 tokens"),
    MLPShape("bottleneck", (1024, 64, 1024), 4096, 2048, "low-rank bottleneck: collapses to FACTOR"),
    MLPShape("deep_chain", (512,) + (2048, 512) * 4, 4096, 1024, "8 Linears, GELU between each"),
    EncoderShape("vit_tiny_encoder", 192, 12, 3, 768, 197, 32, 4, "ViT-Tiny encoder, random weights"),
)}
QUICK_SHAPES = ("vit_tiny", "bottleneck", "deep_chain", "vit_tiny_encoder")


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class Env:
    """What the numbers were measured on."""

    device: str
    device_name: str
    torch: str
    triton: str | None
    lc_kernels: str
    python: str
    date: str
    threads: int
    cpu_count: int | None
    load_avg_start: list[float] | None
    load_avg_end: list[float] | None = None
    command: str = ""
    commit: str | None = None  # short hash of HEAD; None where git could not say
    dirty: bool | None = None  # tracked files differed from that commit
    cpu: str | None = None  # CPU model (/proc/cpuinfo), also on a GPU machine
    transformers: str | None = None




@dataclass
class Row:
    """One provider on one case: time, speedup over the baseline, FLOPs by the cost model."""

    case: str
    shape: str
    tokens: int
    dtype: str
    provider: str
    form: str
    flops: int  # per call, cost model (matmul FLOPs only)
    flop_ratio: float  # baseline FLOPs / this provider's FLOPs
    rel_err: float | None
    status: str  # "ok", or why it was not timed
    timing: Timing | None = None
    speedup: float | None = None  # baseline median / this median, same run
    speedup_low: float | None = None  # q1(baseline) / q3(this): the spread of the ratio
    speedup_high: float | None = None  # q3(baseline) / q1(this)
    latency_ratio: float | None = None  # the speedup the latency table predicts (latency-planned rows)
    tflops: float | None = None
    pct_peak: float | None = None  # of the best large-matmul peak measured in the same run
    load_avg: float | None = None  # 1-minute load average when the case finished: other processes' share

    @property
    def efficiency(self) -> float | None:
        """Measured speedup over the speedup the FLOP ratio predicts."""
        return None if self.speedup is None else self.speedup / self.flop_ratio

    @property
    def ratio(self) -> Ratio | None:
        if self.speedup is None or self.speedup_low is None or self.speedup_high is None:
            return None
        return Ratio(self.speedup, self.speedup_low, self.speedup_high)

    def speedup_text(self) -> str:
        """``1.52× (1.49–1.55)``, or "no measurable change" when the spread covers 1.0×."""
        r = self.ratio
        if r is None or self.provider == BASELINE:
            return _f(self.speedup, ".2f", "×")
        spread = f"{r.low:.2f}–{r.high:.2f}"
        return f"{r.value:.2f}× ({spread})" if r.measurable else f"no measurable change ({r.value:.2f}×, {spread})"


@dataclass
class Report:
    """A whole run: environment, settings, matmul peaks and one row per (case, dtype, provider)."""

    env: Env
    settings: dict
    peak_tflops: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> str:
        rows = [{**asdict(r), "efficiency": r.efficiency} for r in self.rows]
        return json.dumps({"env": asdict(self.env), "settings": self.settings, "peak_tflops": self.peak_tflops,
                           "rows": rows, "targets": [asdict(t) for t in targets(self.rows)]}, indent=1)

    def table(self) -> str:
        """All rows as one markdown table."""
        head = ["case", "shape", "tokens", "dtype", "provider", "form", "median ms", "IQR %", "speedup (spread)",
                "FLOP ratio", "speedup / FLOP ratio", "latency-table prediction", "TFLOP/s", "% peak", "load"]
        body = []
        for r in self.rows:
            t = r.timing
            body.append([r.case, r.shape, str(r.tokens), r.dtype, r.provider, r.form,
                         _f(t and t.median * 1e3, ".3g"), _f(t and t.iqr_pct, ".1f"), r.speedup_text(),
                         _f(r.flop_ratio, ".2f", "×"), _f(r.efficiency, ".2f"), _f(r.latency_ratio, ".2f", "×"),
                         _f(r.tflops, ".3g"),
                         _f(r.pct_peak, ".0f") if r.status == "ok" else r.status, _f(r.load_avg, ".1f")])
        return markdown_table(head, body)

    def summary(self) -> str:
        """The issue's targets with the measured ratios."""
        head = ["target", "case", "dtype", "measured (spread)", "needed", "met"]
        body = [[t.target, t.case, t.dtype,
                 f"{t.measured:.3f}" + (f" ({t.low:.2f}–{t.high:.2f})" if t.low is not None else ""),
                 f"≥ {t.needed:.2f}", t.verdict] for t in targets(self.rows)]
        return markdown_table(head, body)

    def markdown(self) -> str:
        e = self.env
        peaks = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in self.peak_tflops.items())
        load = f"{e.load_avg_start} → {e.load_avg_end}" if e.load_avg_start else "n/a"
        return "\n".join([
            f"# lc-kernels bench: {e.device_name} ({e.device})", "",
            f"Command: `{e.command}`", "",
            f"Commit {e.commit or 'not recorded'}{' (tree dirty)' if e.dirty else ''} · CPU {e.cpu or e.device_name} · "
            f"Date {e.date} · torch {e.torch} · triton {e.triton} · lc_kernels {e.lc_kernels} · "
            f"Python {e.python} · {e.threads} threads of {e.cpu_count} CPUs · load average (1/5/15 min) {load}", "",
            f"Matmul peak measured in this run: {peaks}.", "",
            "Speedups are medians over interleaved rounds relative to `nn.Sequential` eager in the same run, "
            "with their spread (q1 of the baseline over q3 of the provider, to q3 over q1); a spread that "
            "covers 1.0× reads \"no measurable change\". The FLOP ratio is the planner's cost model (matmul "
            "FLOPs only); IQR % is the interquartile range over the median; load is the 1-minute load "
            "average when the case finished (above the thread count, other processes were competing for "
            "the cores).", "",
            "Each collapsed variant is planned twice: by FLOPs (the default, rows without a suffix) and by "
            "`objective=\"latency\"` on this device at the case's token count (`… (latency plan)` rows, "
            "with the speedup the latency table predicts for the MLPs it plans). Where both objectives "
            "choose the same plan, the latency row says so and is not timed twice.", "",
            self.table(), "", "## Targets", "", self.summary(), "",
        ])


@dataclass
class Target:
    """One of the issue's targets on one case: a measured ratio with its spread, and the least it should be."""

    target: str
    case: str
    dtype: str
    measured: float
    needed: float
    low: float | None = None  # the ratio's spread (q1/q3 to q3/q1 of the two timings)
    high: float | None = None

    @property
    def met(self) -> bool:
        return self.measured >= self.needed

    @property
    def verdict(self) -> str:
        """``yes`` / ``NO``, or ``within noise`` when the spread straddles the needed value."""
        if self.low is not None and self.high is not None and self.low < self.needed <= self.high:
            return "within noise"
        return "yes" if self.met else "NO"


def targets(rows: Sequence[Row]) -> list[Target]:
    """The issue's targets, evaluated on the rows that have them (a missing row gives none)."""
    by = {(r.case, r.dtype, r.provider): r for r in rows if r.speedup is not None}
    out = []
    for (case, dtype, provider), r in by.items():
        shape = SHAPES.get(case)
        spread = (r.speedup_low / r.flop_ratio, r.speedup_high / r.flop_ratio) if r.ratio else (None, None)
        if provider == "collapsed" and r.form == "MERGE" and isinstance(shape, MLPShape) and r.tokens >= 4096:
            out.append(Target("MERGE speedup / FLOP ratio", case, dtype, r.efficiency, 0.9, *spread))
        if provider == "partial" and isinstance(shape, MLPShape):
            out.append(Target("PARTIAL (half linear) speedup / FLOP ratio", case, dtype, r.efficiency, 0.95, *spread))
        if provider == "collapsed" and isinstance(shape, EncoderShape):
            out.append(Target("all MLPs collapsed: speedup / FLOP ratio", case, dtype, r.efficiency, 0.9, *spread))
        if provider in ("LCFusedMLP", "LCChain"):
            out.append(Target(f"{provider} eager / nn.Sequential eager", case, dtype, r.speedup, 0.95,
                              r.speedup_low, r.speedup_high))
        compiled_base = by.get((case, dtype, BASELINE + "+compile"))
        if provider in ("LCFusedMLP+compile", "LCChain+compile") and compiled_base is not None:
            rel = Ratio.of(compiled_base.timing, r.timing) if compiled_base.timing and r.timing else None
            out.append(Target(f"{provider} / nn.Sequential+compile", case, dtype, r.speedup / compiled_base.speedup,
                              1.0, rel and rel.low, rel and rel.high))
    return out


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


# ----------------------------------------------------------------------------------------------
# environment and timing


def _report_module():
    """``benchmarks/experiments/_report.py``, loaded by path (this module is itself loaded by path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "experiments" / "_report.py"
    mod = sys.modules.get("lc_kernels_bench_report")
    if mod is None:
        spec = importlib.util.spec_from_file_location("lc_kernels_bench_report", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


def _provenance() -> dict:
    """``_report.py``'s provenance (commit, CPU model, versions): one writer of that record for every
    results file."""
    return _report_module().provenance()


def collect_env(device: torch.device) -> Env:
    """Device, versions, date, commit, CPU model and thread count, as recorded with every result."""
    p = _provenance()
    return Env(
        device=str(device), device_name=device_name(device), torch=torch.__version__, triton=p["triton"],
        lc_kernels=__version__, python=platform.python_version(), date=p["date"], threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), load_avg_start=_load_avg(), commit=p["commit"], dirty=p["dirty"], cpu=p["cpu"],
        transformers=p["transformers"],
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _report_module().cpu_model()


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None










def measure_peak(device: torch.device, dtype: torch.dtype, n: int, rounds: int) -> float:
    """TFLOP/s of the fastest round of an n×n×n ``F.linear``: the ceiling for the % peak column.

    ``F.linear`` with a bias is the op ``nn.Linear`` runs. The fastest round, not the median:
    on a 2-core CPU shared with other processes the median of a 4096³ GEMM fell to 58 GFLOP/s
    while its best round reached 177; a ceiling should not include another process's load.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    a, w = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    bias = torch.randn(n, generator=g).to(device, dtype)
    with torch.inference_mode():
        t = time_interleaved({"linear": lambda: F.linear(a, w, bias)}, device, rounds=rounds, warmup=2,
                             min_time=0.0)["linear"]
    return 2 * n ** 3 / t.min / 1e12


# ----------------------------------------------------------------------------------------------
# cases


@dataclass
class Provider:
    """One way of computing a case's function, with its cost-model FLOPs and float64 expectation."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    form: str
    flops: int
    expected: torch.Tensor
    status: str = "ok"
    rel_err: float | None = None
    latency_ratio: float | None = None  # what the latency table predicts against the dense MLPs


@dataclass
class Case:
    """A shape at a dtype on a device: its inputs and every provider, checked and ready to time."""

    name: str
    label: str
    tokens: int
    dtype: torch.dtype
    device: torch.device
    inputs: list[torch.Tensor]
    providers: list[Provider]

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"case {self.name} has no provider {name!r}; it has {[p.name for p in self.providers]}")

    @property
    def baseline(self) -> Provider:
        return self.provider(BASELINE)


@dataclass
class Settings:
    """How a run builds and times its cases."""

    device: torch.device
    dtypes: list[torch.dtype]
    shapes: list[str]
    tokens: int | None = None  # overrides every MLP shape's token count
    batch: int | None = None  # overrides the encoder's batch
    quick: bool = False
    rounds: int = 21
    warmup: int = 3
    min_time: float = 0.02
    inputs: int = 4  # distinct input tensors cycled through: 4 × 16 MB at GPT-2 medium, beyond any L2/L3
    compile: bool = True
    compile_mode: str = "default"
    partial_fraction: float = 0.5  # share of hidden channels at alpha = 1 for the PARTIAL provider
    peak_size: int = 4096
    seed: int = 0


def form_of(plan: CollapsePlan) -> str:
    """What the collapsed module holds: ``MERGE`` for one joint, else counts like ``6 MERGE, 6 KEEP``."""
    decisions = [j.decision for s in plan.sites for j in s.joints]
    if len(decisions) == 1:
        return decisions[0]
    counts = Counter(decisions)
    return ", ".join(f"{counts[d]} {d}" for d in DECISIONS if counts[d])


def chain_of(seq: nn.Sequential, alphas: Sequence[torch.Tensor] | None = None) -> nn.Module:
    """``LCFusedMLP`` / ``LCChain`` on the same Linear modules (shared weights).

    ``alphas`` gives each joint's slopes (one value, or one per channel); None keeps alpha = 0.
    """
    linears, acts = list(seq[0::2]), list(seq[1::2])
    per_channel = alphas is not None and any(a.numel() > 1 for a in alphas)
    if len(linears) == 2:
        m: nn.Module = LCFusedMLP.from_modules(linears[0], acts[0], linears[1], per_channel=per_channel)
    else:
        m = LCChain(linears, acts, per_channel=per_channel)
    if alphas is not None:
        with torch.no_grad():
            for act, alpha in zip([m.act] if isinstance(m, LCFusedMLP) else m.acts, alphas):
                act.alpha.copy_(alpha.expand_as(act.alpha))
    return m.eval()


def reference_chain(x: torch.Tensor, seq: nn.Sequential, alphas: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 ``ops.reference`` output of ``Linear, act_alpha, Linear, ...`` with GELU bases."""
    linears = list(seq[0::2])
    y = x.double()
    for i, lin in enumerate(linears):
        b = None if lin.bias is None else lin.bias.double()
        last = i == len(linears) - 1
        y = reference.fused_linear(y, lin.weight.double(), b, None if last else alphas[i].to(y),
                                   "identity" if last else "gelu")
    return y


def _make_inputs(shape: tuple[int, ...], s: Settings, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(s.seed + 1)
    return [torch.randn(shape, generator=g).to(s.device, dtype) for _ in range(s.inputs)]


def _compiled(module: nn.Module, s: Settings) -> Callable[[torch.Tensor], torch.Tensor]:
    # dynamic=False: every case has one static shape; automatic dynamic shapes would switch to
    # shape-generic kernels after the second case reuses a module class.
    return torch.compile(module, mode=s.compile_mode, dynamic=False)


def build_mlp_case(shape: MLPShape, dtype: torch.dtype, s: Settings) -> Case:
    """Providers for one MLP or chain shape, all on the weights of one ``nn.Sequential``.

    ``collapsed`` sets every slope to 1 and lets the planner choose (MERGE for transformer
    MLPs, FACTOR for the bottleneck, one Linear for the chain); ``partial`` (two-Linear shapes)
    puts ``partial_fraction`` of the hidden channels at 1 and is kept only where the planner
    turns it into PARTIAL; ``collapsed-half`` (chains) linearises every other joint.
    """
    tokens = s.tokens or (shape.quick_tokens if s.quick else shape.tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(shape.widths, shape.widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(shape.widths) - 2 else [])
        seq = nn.Sequential(*layers).to(s.device, dtype).eval()
    inputs = _make_inputs((tokens, shape.widths[0]), s, dtype)
    n_joints = len(shape.widths) - 2
    hidden = shape.widths[1]
    zeros = [torch.zeros(1)] * n_joints
    with torch.inference_mode():
        expect_orig = reference_chain(inputs[0], seq, zeros)
    keep_flops = decisions_cost(list(shape.widths), [KEEP] * n_joints) * tokens

    lc_name = "LCFusedMLP" if n_joints == 1 else "LCChain"
    lc = chain_of(seq)
    providers = [Provider(BASELINE, seq, "MLP", keep_flops, expect_orig),
                 Provider(lc_name, lc, "MLP", keep_flops, expect_orig)]
    if s.compile:
        providers.insert(1, Provider(BASELINE + "+compile", _compiled(seq, s), "MLP", keep_flops, expect_orig))
        providers.append(Provider(lc_name + "+compile", _compiled(lc, s), "MLP", keep_flops, expect_orig))

    variants = [("collapsed", [torch.ones(1)] * n_joints)]
    if n_joints == 1:
        for name, frac in (("partial", s.partial_fraction), ("partial-quarter", s.partial_fraction / 2)):
            k = round(frac * hidden)
            variants.append((name, [torch.cat([torch.ones(k), torch.zeros(hidden - k)])]))
    else:
        variants.append(("collapsed-half", [torch.ones(1) if i % 2 == 0 else torch.zeros(1) for i in range(n_joints)]))
    table = LatencyTable(s.device, dtype, tokens)
    for name, alphas in variants:
        with torch.inference_mode():
            expect = reference_chain(inputs[0], seq, alphas)
        by_flops = plan_collapse(chain_of(seq, alphas))
        if name.startswith("partial") and form_of(by_flops) != "PARTIAL":
            continue
        plans, same = planned_both_ways(name, chain_of(seq, alphas), by_flops, inputs[0])
        for label, plan in plans:
            m = chain_of(seq, alphas)
            predicted = predicted_ratio(m, plan, table)
            collapse_(m, plan)
            providers.append(Provider(label, m, form_of(plan), plan.flops_after * tokens, expect,
                                      latency_ratio=predicted))
        if same:
            providers.append(same_as(providers[-1], same))
    return Case(shape.name, shape.label, tokens, dtype, s.device, inputs, providers)


def same_plan(a: CollapsePlan, b: CollapsePlan) -> bool:
    """Both plans make the same decision, with the same linear channels, at every joint."""
    def key(p: CollapsePlan) -> list:
        return [(sp.path, j.decision, None if j.linear_channels is None else list(j.linear_channels))
                for sp in p.sites for j in sp.joints]
    return key(a) == key(b)


def planned_both_ways(name: str, model: nn.Module, by_flops: CollapsePlan, example: torch.Tensor,
                      ) -> tuple[list[tuple[str, CollapsePlan]], str | None]:
    """``[(name, FLOP plan), (name + " (latency plan)", latency plan)]`` for ``model``.

    ``objective="latency"`` times each candidate block on the case's device, dtype and token
    count. Where it agrees with the FLOP plan, only the FLOP plan is returned, with the name of
    the latency row that records the agreement.
    """
    by_latency = plan_collapse(model, objective="latency", example=example)
    label = f"{name} (latency plan)"
    if same_plan(by_flops, by_latency):
        return [(name, by_flops)], label
    return [(name, by_flops), (label, by_latency)], None


def same_as(p: Provider, label: str) -> Provider:
    """An untimed row saying that the latency plan is ``p``'s FLOP plan."""
    return replace(p, name=label, status="same plan as FLOPs")


def predicted_ratio(model: nn.Module, plan: CollapsePlan, table: LatencyTable) -> float:
    """The speedup of ``plan``'s sites over their dense form that the measured latency table predicts."""
    before, after = plan_seconds(model, plan, table)
    return before / after


class Block(nn.Module):
    """Pre-norm transformer block; the MLP is a plain ``nn.Sequential`` so ``prepare_`` finds it."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """``depth`` blocks and a final LayerNorm over ``(batch, seq, dim)`` token embeddings."""

    def __init__(self, dim: int, depth: int, heads: int, hidden: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def encoder_other_flops(shape: EncoderShape) -> int:
    """Matmul FLOPs per token outside the MLPs, which the planner does not model.

    Per block: QKV ``2·d·3d``, output projection ``2·d·d``, and attention ``QKᵀ`` plus
    ``softmax·V`` at ``2·seq·d`` each.
    """
    d = shape.dim
    return shape.depth * (2 * d * 3 * d + 2 * d * d + 4 * shape.seq * d)


def build_encoder_case(shape: EncoderShape, dtype: torch.dtype, s: Settings) -> Case:
    """The encoder with 0, half and all of its MLPs collapsed (slopes set to 1, then ``collapse_``)."""
    batch = s.batch or (shape.quick_batch if s.quick else shape.batch)
    tokens = batch * shape.seq
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = Encoder(shape.dim, shape.depth, shape.heads, shape.hidden).to(s.device, dtype).eval()
    inputs = _make_inputs((batch, shape.seq, shape.dim), s, dtype)
    other = encoder_other_flops(shape) * tokens

    def variant(collapsed_blocks: range) -> tuple[nn.Module, torch.Tensor]:
        """The prepared encoder with these blocks' slopes at 1, and its float64 output."""
        m = copy.deepcopy(model)
        sites = prepare_(m)
        for i in collapsed_blocks:
            m.get_submodule(sites[i]).act.alpha.data.fill_(1.0)
        with torch.inference_mode():
            expect = copy.deepcopy(m).double()(inputs[0].double())
        return m.eval(), expect

    lc, expect0 = variant(range(0))
    keep_flops = other + plan_collapse(lc).flops_before * tokens
    providers = [Provider(BASELINE, model, "MLP", keep_flops, expect0),
                 Provider("LCFusedMLP", lc, "MLP", keep_flops, expect0)]
    if s.compile:
        providers.insert(1, Provider(BASELINE + "+compile", _compiled(model, s), "MLP", keep_flops, expect0))
        providers.append(Provider("LCFusedMLP+compile", _compiled(lc, s), "MLP", keep_flops, expect0))
    for name, blocks in (("collapsed-half", range(shape.depth // 2, shape.depth)), ("collapsed", range(shape.depth))):
        prepared, expect = variant(blocks)
        plans, same = planned_both_ways(name, prepared, plan_collapse(prepared), inputs[0])
        for label, plan in plans:
            m = copy.deepcopy(prepared)
            collapse_(m, plan)
            flops = other + plan.flops_after * tokens
            providers.append(Provider(label, m.eval(), form_of(plan), flops, expect))
        if same:
            providers.append(same_as(providers[-1], same))
        if s.compile and name == "collapsed":
            p = next(p for p in providers if p.name == name)
            providers.append(Provider(name + "+compile", _compiled(p.fn, s), p.form, p.flops, expect))
    return Case(shape.name, shape.label, tokens, dtype, s.device, inputs, providers)


def build_case(name: str, dtype: torch.dtype, s: Settings) -> Case:
    """Build, compile (warm-up included) and check every provider of shape ``name``.

    A provider whose output disagrees with the float64 reference beyond ``TOLERANCE``, or whose
    compilation fails, gets a status saying why and is not timed.
    """
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {sorted(SHAPES)}")
    # Compiled code of the previous case is never called again; without a reset, modules of the
    # same class from earlier cases count toward dynamo's recompile limit (8) and the next
    # compile would silently fall back to eager.
    torch._dynamo.reset()
    shape = SHAPES[name]
    case = (build_mlp_case if isinstance(shape, MLPShape) else build_encoder_case)(shape, dtype, s)
    tol = TOLERANCE[dtype]
    with torch.inference_mode():
        for p in case.providers:
            if p.status != "ok":
                continue
            try:
                out = p.fn(case.inputs[0])
            except Exception as e:  # noqa: BLE001 - a failed compile refuses one provider, not the run
                p.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                continue
            p.rel_err = rel_err(out, p.expected)
            if not p.rel_err <= tol:  # also refuses NaN
                p.status = f"refused: rel err {p.rel_err:.1e} > {tol:.0e}"
    return case


def measure_case(case: Case, s: Settings) -> list[Row]:
    """Time every checked provider of ``case`` and turn the result into rows (``pct_peak`` unset)."""
    ok = [p for p in case.providers if p.status == "ok"]
    with torch.inference_mode():
        timings = time_interleaved({p.name: rotating(p.fn, case.inputs) for p in ok}, s.device,
                                   rounds=s.rounds, warmup=s.warmup, min_time=s.min_time)
    base = case.baseline
    base_t = timings.get(base.name)
    load = _load_avg()
    rows = []
    for p in case.providers:
        t = timings.get(p.name)
        tflops = None if t is None else p.flops / t.median / 1e12
        rows.append(Row(
            case=case.name, shape=case.label, tokens=case.tokens, dtype=dtype_name(case.dtype),
            provider=p.name, form=p.form, flops=p.flops, flop_ratio=base.flops / p.flops, rel_err=p.rel_err,
            status=p.status, timing=t, speedup=None if t is None or base_t is None else base_t.median / t.median,
            speedup_low=None if t is None or base_t is None else base_t.q1 / t.q3,
            speedup_high=None if t is None or base_t is None else base_t.q3 / t.q1,
            latency_ratio=p.latency_ratio, tflops=tflops, load_avg=load[0] if load else None,
        ))
    return rows


def run_benchmark(s: Settings, command: str = "", log: Callable[[str], None] = lambda m: None) -> Report:
    """Build, check and time every (shape, dtype) case of ``s``, with the matmul peak around them.

    The peak is measured before and after the cases and the better one kept: in the first
    full run on a shared 2-core CPU, load during the opening peak measurement left it at
    89 GFLOP/s, below the 136 GFLOP/s the encoder then reached.
    """
    report = Report(collect_env(s.device), _settings_dict(s))
    report.env.command = command

    def peaks() -> None:
        for dtype in s.dtypes:
            log(f"peak: {s.peak_size}³ F.linear in {dtype}")
            tflops = measure_peak(s.device, dtype, s.peak_size, rounds=max(3, s.rounds // 2))
            report.peak_tflops[dtype_name(dtype)] = max(tflops, report.peak_tflops.get(dtype_name(dtype), 0.0))

    peaks()
    for name in s.shapes:
        for dtype in s.dtypes:
            log(f"{name} {dtype}: build, compile, check")
            case = build_case(name, dtype, s)
            log(f"{name} {dtype}: timing {sum(p.status == 'ok' for p in case.providers)} providers")
            report.rows += measure_case(case, s)
            del case
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    peaks()
    for r in report.rows:
        if r.tflops is not None:
            r.pct_peak = 100 * r.tflops / report.peak_tflops[r.dtype]
    report.env.load_avg_end = _load_avg()
    return report


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _settings_dict(s: Settings) -> dict:
    d = asdict(s)
    d["device"] = str(s.device)
    d["dtypes"] = [dtype_name(t) for t in s.dtypes]
    return d


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lc-kernels bench``."""
    from lc_kernels.cli._args import int_at_least, nonneg_int, positive_float, positive_int

    shapes = "; ".join(f"{n}: {sh.label}, {sh.about}" for n, sh in SHAPES.items())
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run in under 2 minutes on 2 CPU cores: shapes {', '.join(QUICK_SHAPES)}, "
                             "fewer tokens, 5 rounds, a 2048³ peak matmul")
    parser.add_argument("--json", metavar="PATH", help="write every row, the environment and the targets as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table, environment and command as markdown")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="dtypes to run (default: float32 on CPU, bfloat16 and float16 on CUDA)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None, metavar="SHAPE",
                        help=f"cases to run (default: all). {shapes}")
    parser.add_argument("--tokens", type=positive_int, default=None, help="token count for every MLP shape")
    parser.add_argument("--batch", type=positive_int, default=None, help="images per batch for the encoder (197 tokens each)")
    parser.add_argument("--repeats", type=int_at_least(2), default=None,
                        help="timed rounds per provider; the median is reported (default 21, --quick 5)")
    parser.add_argument("--warmup", type=nonneg_int, default=3, help="untimed calls per provider before timing (default 3)")
    parser.add_argument("--min-time", type=positive_float, default=0.02,
                        help="seconds one timed sample lasts at least; fast calls repeat within it (default 0.02)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode, e.g. max-autotune on CUDA (default: default)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads before timing (CPU)")
    parser.add_argument("--peak-size", type=positive_int, default=None,
                        help="n of the n³ matmul that measures peak (default 4096 on CPU, 8192 on CUDA, --quick 2048)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validate the CLI options and turn them into :class:`Settings`."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for CUDA but torch.cuda.is_available() is False")
    for opt in ("tokens", "batch", "repeats", "warmup", "threads", "peak_size"):
        v = getattr(args, opt)
        if v is not None and v < (0 if opt == "warmup" else 1):
            raise ValueError(f"--{opt.replace('_', '-')} must be a positive integer, got {v}")
    if args.repeats is not None and args.repeats < 2:
        raise ValueError(f"--repeats must be at least 2 to give a spread, got {args.repeats}")
    if not (isinstance(args.min_time, (int, float)) and math.isfinite(args.min_time) and args.min_time > 0):
        raise ValueError(f"--min-time must be a finite number of seconds > 0, got {args.min_time}")
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else (
        [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32])
    default_peak = 2048 if args.quick else 8192 if device.type == "cuda" else 4096
    return Settings(
        device=device, dtypes=dtypes,
        shapes=list(args.shapes or (QUICK_SHAPES if args.quick else SHAPES)),
        tokens=args.tokens, batch=args.batch, quick=args.quick,
        rounds=args.repeats or (5 if args.quick else 21), warmup=args.warmup, min_time=args.min_time,
        compile=not args.no_compile, compile_mode=args.compile_mode, peak_size=args.peak_size or default_peak,
    )


def run(args: argparse.Namespace) -> int:
    """``lc-kernels bench``: print one table (and the targets), optionally write JSON/markdown."""
    try:
        s = settings_from_args(args)
    except ValueError as e:
        print(f"lc-kernels bench: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["lc-kernels", *sys.argv[1:]])
    report = run_benchmark(s, command, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(report.table())
    print()
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown())
    return 0
