"""Planning + collapse time on all-MiniLM-L6-v2 at target 0.5: this checkout against a baseline commit.

Before plans carried their fits, ``collapse_`` refused a fitted plan without ``calib`` and fitted
every site a second time; each site was fitted with one whole-model pass per changed block. Now
the plan's fits are installed as they are and the calibration engine streams the encoder block by
block. This times, in fresh processes (interleaved, ``--repeats`` each), the same user code on the
same data: ``prepare_``, ``plan_collapse(model, calib=calib, target=0.5)``, then ``collapse_`` as
each version needs it (the baseline with ``calib=``, this checkout without). The baseline runs
from a ``git worktree`` of ``--baseline`` (default: the commit before plans carried their fits).
Note ``target`` meant a fraction of what collapsing every site removes before that commit: the
FLOPs each version removes are in the table.

    python benchmarks/experiments/planning_speed.py [--quick] [--threads 2] [--baseline COMMIT]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "26c3643^"  # "Fitted plans carry their fits ..." and its parent

CHILD = r"""
import copy, json, sys, time, torch
sys.path.insert(0, {exp!r})
torch.set_num_threads({threads})
import _encoder as E
import lc_kernels as lc
model, tok = E.load_encoder()
text = E.corpus({seed}, n_calibration={n}, n_heldout=64)
calib = E.batches(tok, text.calibration, 64)
dense = E.ffn_flops(model)
m = copy.deepcopy(model).eval()
t0 = time.perf_counter()
lc.prepare_(m)
plan = lc.plan_collapse(m, calib=calib, target=0.5)
t1 = time.perf_counter()
try:
    lc.collapse_(m, plan)
    how = "collapse_(model, plan)"
except ValueError:
    lc.collapse_(m, plan, calib=calib)
    how = "collapse_(model, plan, calib=calib)"
t2 = time.perf_counter()
print("RESULT " + json.dumps({{"plan_s": t1 - t0, "collapse_s": t2 - t1, "total_s": t2 - t0, "how": how,
                             "removed": 1 - E.ffn_flops(m) / dense}}))
"""


def run(src: Path, threads: int, seed: int, n: int) -> dict:
    code = CHILD.format(exp=str(ROOT / "benchmarks" / "experiments"), threads=threads, seed=seed, n=n)
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(src), capture_output=True, text=True,
                         check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import environment, parse_args, write_results

    import argparse
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--baseline", default=BASELINE)
    extra.add_argument("--repeats", type=int, default=2)
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = parse_args(__doc__, threads=2)
    started = time.perf_counter()
    n = 256 if args.quick else 1024
    commit = subprocess.run(["git", "rev-parse", "--short", known.baseline], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    times: dict[str, list[dict]] = {"baseline": [], "now": []}
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for r in range(known.repeats):
                for name, src in (("baseline", wt), ("now", ROOT)):
                    times[name].append(run(src, args.threads, args.seed, n))
                    print(name, r, times[name][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, check=False)
    rows = []
    for name, label in (("baseline", f"baseline {commit}"), ("now", f"this checkout ({head})")):
        ts = [t["total_s"] for t in times[name]]
        rows.append({"version": label, "collapse call": times[name][0]["how"],
                     "plan s (median)": round(statistics.median(t["plan_s"] for t in times[name]), 1),
                     "collapse s (median)": round(statistics.median(t["collapse_s"] for t in times[name]), 1),
                     "total s (median)": round(statistics.median(ts), 1), "total s (min-max)": f"{min(ts):.1f}-{max(ts):.1f}",
                     "FFN FLOPs removed": round(times[name][0]["removed"], 4)})
    b, h = ([t["total_s"] for t in times[k]] for k in ("baseline", "now"))
    ratio = statistics.median(b) / statistics.median(h)
    spread = f"{min(b) / max(h):.2f}-{max(b) / min(h):.2f}"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    write_results("planning_speed", args.out, rows, list(rows[0]),
                  title="Planning + collapse of all-MiniLM-L6-v2 at target 0.5: time against the baseline",
                  setup={"calibration sentences": n, "repeats (interleaved, fresh processes)": known.repeats,
                         "speedup (median baseline / median now)": round(ratio, 2), "speedup range": spread,
                         "load average at the end": load},
                  env=environment(args, started),
                  notes=["times include prepare_, plan_collapse and collapse_, not model loading"])


if __name__ == "__main__":
    main()
