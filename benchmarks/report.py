"""Render every README results table from the committed results files, or check that it matches.

    python benchmarks/report.py            # rewrite README.md's tables in place
    python benchmarks/report.py --check    # exit 1, with a diff, where a table differs from its file

A table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``. NAME is either a
named table of ``TABLES`` (a results file, the rows to show and how to print each column) or the
path of a results file under ``benchmarks/results/`` without ``.json`` (every row, every column).
Two layouts are read: the experiments' (``rows`` + ``environment``, written by
``benchmarks/experiments/_report.py``) and the bench harness's (``rows`` + ``env``). Each table is
followed by one source line: the file, its date, commit, machine and command; what a file does not
record prints as "not recorded", never a guess.

``--check`` also fails when a results file under ``benchmarks/results/`` names a command whose
script no longer exists.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- results:(?P<name>[\w./-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S)


# ----------------------------------------------------------------------------------------------
# cells


def _float(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


FORMATS: dict[str, Callable[[object], str]] = {
    "pct1": lambda v: f"{100 * v:.1f}%",
    "pct2": lambda v: f"{100 * v:.2f}%",
    "x2": lambda v: f"{v:.2f}×",
    "x3": lambda v: f"{v:.3f}×",
    "f1": lambda v: f"{v:.1f}",
    "f2": lambda v: f"{v:.2f}",
    "f3": lambda v: f"{v:.3f}",
    "int": lambda v: f"{v:,}",
}


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    fmt: str = ""  # a FORMATS key; "spread" prints key with key_low / key_high as "1.23× (1.10–1.40)"

    def cell(self, row: dict) -> str:
        v = row.get(self.key)
        if v is None or v == "":
            return "–"
        if self.fmt == "spread":
            lo, hi = row.get(f"{self.key}_low"), row.get(f"{self.key}_high")
            return f"{v:.2f}×" + (f" ({lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else "")
        if self.fmt and isinstance(v, (int, float)) and not isinstance(v, bool):
            return FORMATS[self.fmt](v)
        if isinstance(v, float):
            return _float(v)
        return str(v).replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class Table:
    """Which rows of which results file, and how each column prints."""

    source: str  # path under benchmarks/results/, without .json (a glob: the newest match)
    columns: tuple[Column, ...]
    keep: Callable[[dict], bool] = lambda row: True
    rows_key: str = "rows"


def _c(*specs: tuple[str, ...]) -> tuple[Column, ...]:
    return tuple(Column(*s) for s in specs)


_BENCH_COLUMNS = _c(("case", "case"), ("shape", "shape"), ("tokens", "tokens"), ("provider", "provider"),
                    ("form", "form"), ("speedup vs nn.Sequential (spread)", "speedup", "spread"),
                    ("FLOP ratio", "flop_ratio", "x2"), ("speedup / FLOP ratio", "efficiency", "f2"))
_BENCH_PROVIDERS = {"LCFusedMLP", "LCChain", "collapsed", "collapsed-half", "partial", "partial-quarter"}

TABLES: dict[str, Table] = {
    "fitted_encoder": Table(
        "experiments/fitted_encoder",
        _c(("method", "method"), ("FFN FLOPs removed", "ffn_flops_removed", "pct1"),
           ("held-out cosine", "heldout_cosine", "f3"), ("kept widths", "kept_widths"), ("fit kept", "fit_chosen"),
           ("seconds", "seconds", "f1")),
        keep=lambda r: not re.match(r"lstsq FFN \d", str(r.get("method")))),
    "nonlinear_task": Table(
        "experiments/nonlinear_task",
        _c(("method", "method"), ("target", "budget", "pct1"), ("FLOPs (of the MLP)", "flops_frac", "pct1"),
           ("test acc", "test_acc", "pct2"), ("extra steps", "extra_steps")),
        keep=lambda r: r.get("budget") in (None, 0.25, 0.5)),
    "llm_ffn": Table(
        "experiments/llm_ffn",
        _c(("method", "method"), ("FFN FLOPs removed", "FFN FLOPs removed", "pct1"),
           ("held-out perplexity", "perplexity", "f1"), ("× dense", "x dense", "x3"),
           ("repeated 4-grams", "repeated 4-grams", "pct1"), ("allocation kept", "allocation"),
           ("fit kept", "fit"), ("seconds", "seconds", "f1"))),
    "llm_ffn_heal": Table(
        "experiments/llm_ffn-heal",
        _c(("method", "method"), ("FFN FLOPs removed", "FFN FLOPs removed", "pct1"),
           ("held-out perplexity", "perplexity", "f1"), ("× dense", "x dense", "x3"),
           ("repeated 4-grams", "repeated 4-grams", "pct1"), ("held-out KL before / best", "held-out KL before / best"),
           ("best step", "best step"), ("healing s", "heal s", "f1"))),
    "llm_decode_profile": Table(
        "experiments/llm_decode_profile",
        _c(("case", "case"), ("dense tok/s", "dense tok/s", "f1"), ("compressed tok/s", "compressed tok/s", "f1"),
           ("speedup", "speedup", "x2"), ("spread", "spread"), ("FLOP prediction", "FLOP prediction", "x2"),
           ("Amdahl (FFN GEMMs only shrink)", "Amdahl (FFN GEMM share shrinks only)", "x2"),
           ("dense FFN GEMM share", "dense FFN GEMM share", "pct1"), ("dense GEMM share", "dense GEMM share", "pct1"),
           ("dense Python share", "dense Python share", "pct1"))),
    "llm_decode": Table(
        "experiments/llm_decode",
        _c(("case", "case"), ("dense tok/s", "dense tok/s", "f1"), ("compressed tok/s", "compressed tok/s", "f1"),
           ("speedup", "speedup", "x2"), ("spread", "spread"), ("FLOP prediction", "FLOP prediction", "x2"),
           ("of the FLOP prediction", "fraction of prediction", "f2"))),
    "onnx_latency": Table(
        "experiments/onnx_latency",
        _c(("model", "model"), ("batch", "batch"), ("median ms", "median_ms", "f1"), ("speedup", "speedup"),
           ("Linear FLOPs / token", "linear_flops_per_token", "int"),
           ("FFN FLOPs / token", "ffn_flops_per_token", "int"), ("held-out cosine", "heldout_cosine", "f3"))),
    "speedup_pairs": Table(
        "experiments/speedup_pairs",
        _c(("model", "model"), ("plan", "plan"), ("objective", "objective"), ("form", "form"), ("tokens", "tokens"),
           ("MLP FLOP ratio", "MLP FLOP ratio", "x2"), ("predicted", "predicted", "x2"), ("measured", "measured"))),
    "bench_cpu": Table("cpu-????-??-??", _BENCH_COLUMNS, keep=lambda r: r.get("provider") in _BENCH_PROVIDERS),
    "bench_cpu_16tokens": Table("cpu-????-??-??-16tokens", _BENCH_COLUMNS,
                                keep=lambda r: r.get("provider") in _BENCH_PROVIDERS),
}


# ----------------------------------------------------------------------------------------------
# reading results files


@dataclass
class Results:
    path: Path
    data: dict
    env: dict = field(init=False)

    def __post_init__(self) -> None:
        self.env = self.data.get("environment") or self.data.get("env") or {}

    def rows(self, key: str = "rows") -> list[dict]:
        rows = self.data.get(key)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{self.path} holds no list of rows under {key!r}")
        return rows

    def source_line(self, results_dir: Path) -> str:
        e = self.env
        date = str(e.get("date") or "date not recorded")[:10]
        commit = e.get("commit")
        commit = (f"commit {commit}" + (" (uncommitted changes)" if e.get("dirty") else "")) if commit \
            else "commit not recorded"
        # The bench harness has always read the CPU model into device_name; the experiments recorded
        # only "cpu (x86_64, N cores)" before they recorded the model.
        cpu = e.get("cpu") or (e.get("device_name") if e.get("device") == "cpu" else None)
        machine = cpu or f"CPU model not recorded ({e.get('device', 'device not recorded')})"
        if e.get("device") not in (None, "cpu") and not str(e.get("device")).startswith("cpu"):
            machine += f", {e.get('device_name') or e['device']}"
        if e.get("threads"):
            machine += f", {e['threads']} threads"
        cmd = e.get("command") or "command not recorded"
        shown = "benchmarks/results/" + self.path.relative_to(results_dir).as_posix()
        return f"<sub>Source: `{shown}` · {date} · {commit} · {machine} · `{cmd}`</sub>"


def load(name: str, results_dir: Path) -> Results:
    """The results file ``name`` (a path under ``results_dir`` without ``.json``); a glob pattern
    (``cpu-????-??-??``) picks the newest match by name, so a dated rerun replaces the table."""
    if any(c in name for c in "*?["):
        found = sorted(results_dir.glob(f"{name}.json"))
        if not found:
            raise FileNotFoundError(f"no results file matches {results_dir / name}.json")
        return Results(found[-1], json.loads(found[-1].read_text()))
    path = results_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path} for table {name!r}")
    return Results(path, json.loads(path.read_text()))


def _generic_columns(rows: list[dict]) -> tuple[Column, ...]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if not isinstance(v, (dict, list)):
                keys.setdefault(k)
    return tuple(Column(k, k) for k in keys)


def render(name: str, results_dir: Path = RESULTS) -> str:
    """The markdown between the markers of ``name``: the table, then its source line."""
    spec = TABLES.get(name)
    res = load(spec.source if spec else name, results_dir)
    rows = res.rows(spec.rows_key if spec else "rows")
    columns = spec.columns if spec else _generic_columns(rows)
    rows = [r for r in rows if spec is None or spec.keep(r)]
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + res.source_line(results_dir) + "\n"


def rendered(text: str, results_dir: Path = RESULTS) -> str:
    """``text`` (a README) with every marked table rendered from its results file."""
    return MARKER.sub(lambda m: f"<!-- results:{m['name']} -->\n{render(m['name'], results_dir)}"
                                f"<!-- /results:{m['name']} -->", text)


# ----------------------------------------------------------------------------------------------
# commands that produced the results


def missing_script(command: str, results_file: Path, results_dir: Path) -> str | None:
    """The script a recorded command runs, where it no longer exists (else None).

    Commands are recorded relative to the repository root; older files recorded the script as it
    was typed in its own folder (``python llm_ffn.py``), so that folder is tried too.
    """
    try:
        argv = shlex.split(command)
    except ValueError:
        return command
    if not argv:
        return None
    if argv[0] == "lc-kernels":
        sub = next((a for a in argv[1:] if not a.startswith("-")), None)
        return None if sub is None or (ROOT / "lc_kernels" / "cli" / f"{sub}.py").is_file() else f"lc-kernels {sub}"
    if Path(argv[0]).name.startswith("python"):
        argv = argv[1:]
    script = next((a for a in argv if a.endswith(".py")), None)
    if script is None:
        return None
    rel = results_file.parent.relative_to(results_dir)  # results/experiments/ <- benchmarks/experiments/
    for base in (ROOT, ROOT / "benchmarks" / rel):
        if (base / script).is_file():
            return None
    return script


def problems(readme: Path = README, results_dir: Path = RESULTS) -> list[str]:
    """What ``--check`` reports: tables that differ (with a diff), commands whose script is gone."""
    out = []
    text = readme.read_text()
    names = [m["name"] for m in MARKER.finditer(text)]
    for m in MARKER.finditer(text):
        name = m["name"]
        try:
            want = render(name, results_dir)
        except (OSError, ValueError) as e:
            out.append(f"table {name!r}: {e}")
            continue
        if m["body"] != want:
            diff = "".join(difflib.unified_diff(m["body"].splitlines(True), want.splitlines(True),
                                                f"README.md ({name})", f"rendered from results ({name})"))
            out.append(f"table {name!r} differs from its results file (run python benchmarks/report.py):\n{diff}")
    if len(set(names)) != len(names):
        out.append(f"a table is marked twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    for path in sorted(results_dir.rglob("*.json")):
        try:
            res = Results(path, json.loads(path.read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        cmd = res.env.get("command") if isinstance(res.env, dict) else None
        gone = missing_script(cmd, path, results_dir) if cmd else None
        if gone:
            out.append(f"{path}: its command `{cmd}` runs {gone}, which no longer exists (rerun what replaced it, "
                       f"or delete the file and its table)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where the README differs")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.check:
        found = problems(args.readme, args.results)
        for f in found:
            print(f, file=sys.stderr)
        n = len(MARKER.findall(args.readme.read_text()))
        print(f"{args.readme}: {n} results tables, {len(found)} problem(s)")
        return 1 if found else 0
    text = args.readme.read_text()
    new = rendered(text, args.results)
    if new != text:
        args.readme.write_text(new)
    print(f"{args.readme}: {len(MARKER.findall(new))} results tables rendered"
          + ("" if new != text else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
