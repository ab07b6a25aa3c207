#!/usr/bin/env bash
# benchmarks/gpu_check.sh — everything a GPU machine should check, in one command, in minutes.
#
# On a machine with an NVIDIA GPU: installs what it needs (keeping the machine's torch), runs the
# kernel / op / compile tests natively (no interpreter), benchmarks the transformer MLP shapes in
# bf16 and fp16 against eager and torch.compile (default and max-autotune), measures the
# constants prefer_fused_mlp assumes (matmul peak, bandwidth, launch cost), checks and times the
# gated op (fused_gated_linear) against two Linears at Llama shapes, times a small model's first call
# with and without lc.warmup (fresh processes, private caches), compiles every kernel
# config ahead of time for the device's architecture, and writes it all to
# benchmarks/results/<device>-<date>.{md,json}. It checks its own elapsed time and skips a step
# that would run past the budget (LC_GPU_BUDGET_S, default 480 s).
#
# Without a GPU it says so and does a CPU dry run of the same steps at toy sizes (CI runs this, so
# the script cannot rot), writing under a temporary directory, and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${LC_GPU_BUDGET_S:-480}
START=$SECONDS
PY=${PYTHON:-python}
unset LC_KERNELS_FORCE_TRITON TRITON_INTERPRET LC_KERNELS_DISABLE_TRITON

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    DRY=0
    DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
    OUTDIR=benchmarks/results
else
    DRY=1
    DEVICE=cpu-dry-run
    OUTDIR=$(mktemp -d)
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): CPU dry run of every step"
fi
STAMP="$DEVICE-$(date -u +%Y-%m-%d)"
OUT="$OUTDIR/$STAMP"
LOG="$OUT.log"
: > "$LOG"
STATUS=()

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME ESTIMATED_SECONDS COMMAND...: run it unless it would overrun the budget.
step() {
    local name=$1 est=$2; shift 2
    if [ "$(left)" -lt "$est" ]; then
        echo "gpu_check: skip $name (needs ~${est}s, $(left)s left)" | tee -a "$LOG"
        STATUS+=("$name: skipped (budget)")
        return 0
    fi
    echo "gpu_check: $name" | tee -a "$LOG"
    local t0=$SECONDS
    local runner=(timeout "$(left)")
    [ "$(type -t "$1")" = function ] && runner=()  # timeout runs programs, not shell functions
    if "${runner[@]}" "$@" >> "$LOG" 2>&1; then
        STATUS+=("$name: ok ($((SECONDS - t0)) s)")
    else
        STATUS+=("$name: FAILED ($((SECONDS - t0)) s, see $LOG)")
    fi
}

if [ "$DRY" = 0 ]; then
    # Keep the machine's torch (and its triton): install the package and test tools beside it.
    install() { $PY -m pip install -q --no-deps -e . && $PY -m pip install -q pytest pytest-benchmark safetensors numpy; }
    step install 120 install
    step tests-native 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_ops.py tests/test_compile.py \
        tests/test_gated_op.py
    # Before the long MLP benchmarks, so the default budget still reaches the newest kernel.
    step gated 120 $PY benchmarks/gated_check.py --json "$OUT-gated.json" --markdown "$OUT-gated.md"
    # First-call latency with and without lc.warmup, each in a fresh process with private caches.
    step warmup-latency 120 $PY benchmarks/warmup_latency.py --json "$OUT-warmup.json" --markdown "$OUT-warmup.md"
    step bench-eager-compile 150 $PY -m lc_kernels.cli bench --dtype bfloat16 float16 \
        --shapes vit_small vit_base gpt2_medium bottleneck deep_chain vit_tiny_encoder \
        --json "$OUT-bench.json" --markdown "$OUT-bench.md"
    step bench-max-autotune 150 $PY -m lc_kernels.cli bench --dtype bfloat16 --compile-mode max-autotune \
        --shapes vit_base gpt2_medium --json "$OUT-autotune.json" --markdown "$OUT-autotune.md"
    step constants 30 $PY benchmarks/gpu_constants.py --json "$OUT-constants.json"
    ARCH=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")
    step aot-compile 60 $PY benchmarks/aot_compile.py --arch "$ARCH" --json "$OUT-aot.json" --md "$OUT-aot.md"
else
    step tests-cpu 120 $PY -m pytest -q -p no:cacheprovider tests/test_ops.py
    step bench-cpu 120 $PY -m lc_kernels.cli bench --quick --shapes vit_tiny --no-compile --repeats 2 \
        --json "$OUT-bench.json" --markdown "$OUT-bench.md"
    step constants-cpu 30 $PY benchmarks/gpu_constants.py --quick --json "$OUT-constants.json"
    step gated-cpu 60 $PY benchmarks/gated_check.py --quick --no-compile --json "$OUT-gated.json" \
        --markdown "$OUT-gated.md"
    step warmup-latency-cpu 60 $PY benchmarks/warmup_latency.py --quick --json "$OUT-warmup.json" \
        --markdown "$OUT-warmup.md"
    if [ -f benchmarks/aot_compile.py ]; then
        step aot-compile-cpu 120 $PY benchmarks/aot_compile.py --arch 90 --json "$OUT-aot.json" --md "$OUT-aot.md"
    fi
fi

{
    echo "# gpu_check: $DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    $PY -c "import torch, platform; import importlib.util as u; t = u.find_spec('triton'); \
print(f'torch {torch.__version__}, triton', __import__('triton').__version__ if t else 'absent', f', python {platform.python_version()}')"
    echo
    for s in "${STATUS[@]}"; do echo "- $s"; done
    echo
    for f in "$OUT-constants.json" "$OUT-bench.md" "$OUT-autotune.md" "$OUT-gated.md" "$OUT-warmup.md" "$OUT-aot.md"; do
        [ -f "$f" ] && { echo "## $(basename "$f")"; echo; cat "$f"; echo; }
    done
} > "$OUT.md"
$PY - "$OUT" "${STATUS[@]}" <<'PYEOF'
import json, sys
out, status = sys.argv[1], sys.argv[2:]
parts = {}
for suffix in ("constants", "bench", "autotune", "gated", "warmup", "aot"):
    try:
        with open(f"{out}-{suffix}.json") as f:
            parts[suffix] = json.load(f)
    except (OSError, ValueError):
        pass
with open(f"{out}.json", "w") as f:
    json.dump({"status": status, **parts}, f, indent=1)
PYEOF
echo "gpu_check: wrote $OUT.md and $OUT.json in $((SECONDS - START)) s"
printf '%s\n' "${STATUS[@]}"
if printf '%s\n' "${STATUS[@]}" | grep -q FAILED; then
    echo "gpu_check: a step failed (see $LOG)"
    exit 1
fi
exit 0
