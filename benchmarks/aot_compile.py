"""Compile the Triton kernels ahead of time for CUDA targets, with no GPU present.

``triton.compile`` runs the whole CUDA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via
the ``ptxas`` bundled with Triton) on any machine with a ``GPUTarget``; only loading the cubin
needs a driver. That checks, per case, on ``sm_80`` (A100) and ``sm_90`` (H100):

* that the kernel compiles at all for that target, dtype, activation, flags and config;
* ``shared_bytes``: shared memory per block (``compiled.metadata.shared``). Above the target's
  opt-in limit (``SHARED_LIMIT``) the launch fails with ``OutOfResources``: the autotuner then
  silently drops the config, so it is reported here as a failure ("would never launch");
* ``tensor_core_instructions``: ``wgmma.mma_async`` + ``mma.sync`` instructions in the PTX.
  16-bit and TF32 ``tl.dot`` must use them; IEEE fp32 runs on FMA units and has none.

Kernels are the raw ``@triton.jit`` functions of ``lc_kernels.kernels.fused_linear`` /
``fused_mlp`` / ``fused_gated_linear`` (``ops`` only wraps them in ``triton.autotune``).
Arguments are taken from the kernel definition: ``*_ptr`` parameters are pointers,
``tl.constexpr`` parameters are
constexprs, the rest (sizes, strides) integers, specialized the way ``JITFunction.run`` would
specialize them for a launch on contiguous tensors (``SPECS``): an integer equal to 1 becomes
the constexpr 1, pointers and integers divisible by 16 get ``tt.divisibility=16``. Without
those hints Triton cannot vectorize or pipeline the loads, and a compile would report the
shared memory and instructions of a kernel no real launch runs.

``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on CPU machines) does not change
``triton.compile``, but it does change what ``@triton.jit`` returns when the kernel modules
are imported: an ``InterpretedFunction``, which cannot be compiled, and the interpreter also
patches ``triton.language`` while it runs kernels. :func:`run_cases` therefore compiles in
fresh ``spawn`` worker processes that drop ``TRITON_INTERPRET`` before importing anything;
:func:`compile_case` compiles in the calling process and refuses interpreted kernels.

CLI (``gpu_check.sh`` calls it; no GPU needed)::

    python benchmarks/aot_compile.py [--full] [--arch 80 90] [--json PATH] [--md PATH]

Default: the reduced set of :func:`cases`; ``--full``: the whole cross product. Exit status 1
when any case fails.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from typing import Any, Iterable, Optional

# Shared memory per block with the opt-in carve-out (cudaFuncAttributeMaxDynamicSharedMemorySize).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

DTYPES = ("fp32", "fp16", "bf16")
ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")

KERNELS = {
    "fused_linear": ("lc_kernels.kernels.fused_linear", "fused_linear_kernel"),
    "fused_mlp": ("lc_kernels.kernels.fused_mlp", "fused_mlp_kernel"),
    "fused_gated_linear": ("lc_kernels.kernels.fused_gated_linear", "fused_gated_linear_kernel"),
}

# Boolean flags of each kernel: case key -> kernel constexpr.
BOOL_FLAGS = {
    "fused_linear": {"has_bias": "HAS_BIAS", "has_alpha": "HAS_ALPHA"},
    "fused_mlp": {"has_b1": "HAS_B1", "has_alpha": "HAS_ALPHA", "has_b2": "HAS_B2"},
    "fused_gated_linear": {"has_bias": "HAS_BIAS", "has_alpha": "HAS_ALPHA"},
}

# Integer arguments of a representative launch (contiguous row-major operands, per-channel
# alpha): "aligned" is a model shape (everything a multiple of 16), "unaligned" the same with
# odd sizes, which loses the divisibility hints. Unit strides are constexpr 1 in both, as on GPU.
_SHAPES = {
    "aligned": {"M": 4096, "N": 3072, "K": 768, "H": 64},
    "unaligned": {"M": 4095, "N": 3071, "K": 767, "H": 63},
}
SPECS = tuple(_SHAPES)


def _int_args(kernel_name: str, spec: str) -> dict[str, int]:
    s = _SHAPES[spec]
    m, n, k, h = s["M"], s["N"], s["K"], s["H"]
    bucket = 16
    while bucket < m and bucket < 4096:
        bucket *= 2
    if kernel_name == "fused_linear":
        return {
            "M": m, "N": n, "K": k, "M_BUCKET": bucket,
            "stride_xm": k, "stride_xk": 1, "stride_wn": k, "stride_wk": 1,
            "stride_b": 1, "stride_alpha": 1, "stride_ym": n, "stride_yn": 1,
        }
    if kernel_name == "fused_gated_linear":
        # H = N gate channels: w is (2N, K), the output (M, N).
        return {
            "M": m, "H": n, "K": k, "M_BUCKET": bucket,
            "stride_xm": k, "stride_xk": 1, "stride_wn": k, "stride_wk": 1,
            "stride_b": 1, "stride_alpha": 1, "stride_ym": n, "stride_yn": 1,
        }
    return {
        "M": m, "N": n, "K": k, "H": h, "M_BUCKET": bucket,
        "stride_xm": k, "stride_xk": 1, "stride_w1h": k, "stride_w1k": 1,
        "stride_b1": 1, "stride_alpha": 1, "stride_w2n": h, "stride_w2h": 1,
        "stride_b2": 1, "stride_ym": n, "stride_yn": 1,
    }


# ----------------------------------------------------------------------------------------------
# Case enumeration (imports the kernel modules only for their CONFIGS)
# ----------------------------------------------------------------------------------------------

def _kernel_module(kernel_name: str):
    return importlib.import_module(KERNELS[kernel_name][0])


def config_dict(config: Any) -> dict[str, Any]:
    """A ``triton.Config`` (or an equivalent dict) as a plain, JSON-able dict."""
    if isinstance(config, dict):
        return dict(config)
    out = dict(config.kwargs)
    out["num_warps"] = config.num_warps
    out["num_stages"] = config.num_stages
    if getattr(config, "num_ctas", 1) != 1:
        out["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None) is not None:
        out["maxnreg"] = config.maxnreg
    return out


def kernel_configs(kernel_name: str) -> list[dict[str, Any]]:
    """The kernel's GPU autotune configs (``CONFIGS``, not ``INTERPRETER_CONFIGS``)."""
    return [config_dict(c) for c in _kernel_module(kernel_name).CONFIGS]


def precisions(dtype: str) -> tuple[str, ...]:
    """``INPUT_PRECISION`` values a launch uses: fp32 follows torch's matmul precision."""
    return ("ieee", "tf32") if dtype == "fp32" else ("tf32",)


def flag_combinations(kernel_name: str, act: str, dtype: str) -> list[dict[str, Any]]:
    """Every flag combination the launchers can produce for ``act`` and ``dtype``.

    ``HAS_ALPHA`` is never set with ``act="identity"`` (``alpha * z + (1 - alpha) * z = z``,
    the launcher drops it), so those combinations are left out. ``DOT_IN_FP32`` is only set
    under the interpreter and is always False on GPU.
    """
    names = list(BOOL_FLAGS[kernel_name])
    out = []
    for values in itertools.product((False, True), repeat=len(names)):
        flags = dict(zip(names, values))
        if act == "identity" and flags["has_alpha"]:
            continue
        for precision in precisions(dtype):
            out.append({**flags, "input_precision": precision})
    return out


def _case(kernel, arch, dtype, act, flags, config, spec="aligned") -> dict[str, Any]:
    return {"kernel": kernel, "arch": arch, "dtype": dtype, "act": act, "flags": flags,
            "config": config, "spec": spec}


# The config the dtype x activation x flags sweep compiles at: a mid-size tile that gets wgmma
# on sm_90 (BLOCK_M >= 64) and compiles quickly.
SWEEP_CONFIG = {"fused_linear": 4, "fused_mlp": 3, "fused_gated_linear": 4}  # index into CONFIGS

# What the config sweep compiles each config at, chosen from the full cross product (Triton
# 3.8): bf16 with exact GELU and every flag (the largest epilogue: most registers), and fp32 in
# TF32 with the identity and no bias/alpha (the most shared memory: TF32 tiles are fp32 and on
# sm_90 TF32 needs more than IEEE; the bare MLP low-rank pair needs more than with an epilogue).
CONFIG_SWEEP = (("bf16", "gelu", True, "tf32"), ("fp32", "identity", False, "tf32"))


def cases(full: bool, archs: Iterable[int] = (80, 90), kernels: Iterable[str] = tuple(KERNELS),
          sweep_archs: Optional[Iterable[int]] = None, spec: str = "aligned") -> list[dict[str, Any]]:
    """The cases to compile.

    ``full=False``: every autotune config of each kernel once per entry of ``CONFIG_SWEEP``,
    plus, at the kernel's ``SWEEP_CONFIG``, every dtype x activation x flag combination on
    ``sweep_archs`` (default: all of ``archs``) and every dtype x precision (GELU, every flag)
    on the other archs. ``full=True``: the whole cross product config x dtype x activation x
    flags on every arch.
    """
    archs = list(archs)
    sweep_archs = archs if sweep_archs is None else [a for a in sweep_archs if a in archs]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(c: dict[str, Any]) -> None:
        key = case_id(c)
        mod = _kernel_module(c["kernel"])
        if hasattr(mod, "fits") and not mod.fits(c["config"], c["config"]["num_stages"], DTYPE_BYTES[c["dtype"]]):
            return  # the autotuner prunes this config for this dtype: it is never launched
        if key not in seen:
            seen.add(key)
            out.append(c)

    for kernel in kernels:
        configs = kernel_configs(kernel)
        all_on = {name: True for name in BOOL_FLAGS[kernel]}
        for arch in archs:
            if full:
                for config, dtype, act in itertools.product(configs, DTYPES, ACTIVATIONS):
                    for flags in flag_combinations(kernel, act, dtype):
                        add(_case(kernel, arch, dtype, act, flags, config, spec))
                continue
            for dtype, act, flags_on, precision in CONFIG_SWEEP:
                flags = {name: flags_on for name in BOOL_FLAGS[kernel]}
                for config in configs:
                    add(_case(kernel, arch, dtype, act, {**flags, "input_precision": precision}, config, spec))
            config = configs[SWEEP_CONFIG[kernel]]
            if arch in sweep_archs:
                for dtype, act in itertools.product(DTYPES, ACTIVATIONS):
                    for flags in flag_combinations(kernel, act, dtype):
                        add(_case(kernel, arch, dtype, act, flags, config, spec))
            else:
                for dtype in DTYPES:
                    for precision in precisions(dtype):
                        add(_case(kernel, arch, dtype, "gelu", {**all_on, "input_precision": precision}, config, spec))
    return out


DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def config_label(config: dict[str, Any]) -> str:
    blocks = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{config['num_warps']} s{config['num_stages']}"


def flags_label(flags: dict[str, Any], dtype: str = "fp32") -> str:
    """``bias+alpha``, ``b1+b2+tf32``, ``plain``...; the precision only for fp32 (16-bit dots
    ignore it)."""
    parts = [k.removeprefix("has_") for k, v in flags.items() if v is True]
    if dtype == "fp32" and flags.get("input_precision"):
        parts.append(flags["input_precision"])
    return "+".join(parts) or "plain"


def case_id(c: dict[str, Any]) -> str:
    cfg = config_label(c["config"]).replace(" ", "-")
    spec = "" if c.get("spec", "aligned") == "aligned" else f"-{c['spec']}"
    return f"{c['kernel']}-sm{c['arch']}-{c['dtype']}-{c['act']}-{flags_label(c['flags'], c['dtype'])}-{cfg}{spec}"


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

_TC_PATTERNS = {
    "wgmma": re.compile(r"^\s*(?:@!?%p\d+\s+)?wgmma\.mma_async\b", re.M),
    "mma.sync": re.compile(r"^\s*(?:@!?%p\d+\s+)?mma\.sync\b", re.M),
}


def tensor_core_counts(ptx: str) -> dict[str, int]:
    """Tensor-core MMA instructions in ``ptx``: ``wgmma.mma_async`` (sm_90) and ``mma.sync``
    (sm_80+); fences, commits and waits are not counted."""
    return {kind: len(p.findall(ptx)) for kind, p in _TC_PATTERNS.items()}


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)")


def resource_usage(cubin: Optional[bytes]) -> dict[str, Optional[int]]:
    """``registers`` per thread and ``spill_bytes`` (local memory + stack per thread) from
    ``cuobjdump --dump-resource-usage`` of the cubin (bundled with Triton); ``None`` where the
    tool is missing. Spills are reported, not failed: they cost speed, not correctness."""
    out: dict[str, Optional[int]] = {"registers": None, "spill_bytes": None}
    if not cubin:
        return out
    try:
        import subprocess
        import tempfile

        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                  timeout=60).stdout
    except Exception:  # noqa: BLE001 - optional information
        return out
    m = _RESOURCE.search(text)
    if m:
        out["registers"] = int(m.group(1))
        out["spill_bytes"] = int(m.group(2)) + int(m.group(3))
    return out


def _load_kernel(kernel_name: str):
    from triton.runtime.jit import JITFunction

    fn = getattr(_kernel_module(kernel_name), KERNELS[kernel_name][1])
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{KERNELS[kernel_name][0]} was imported with TRITON_INTERPRET=1, so "
            f"{KERNELS[kernel_name][1]} is a {type(fn).__name__} that triton.compile cannot "
            f"compile; use run_cases() (fresh worker processes) or unset TRITON_INTERPRET"
        )
    return fn


def _signature(fn, kernel_name: str, dtype: str, act: str, flags: dict[str, Any], config: dict[str, Any],
               spec: str) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource``, from the kernel's own parameters."""
    constexpr_values = {
        "ACT": act,
        "INPUT_PRECISION": flags.get("input_precision", "ieee" if dtype == "fp32" else "tf32"),
        "DOT_IN_FP32": bool(flags.get("dot_in_fp32", False)),
        **{const: bool(flags.get(key, False)) for key, const in BOOL_FLAGS[kernel_name].items()},
        **{k: v for k, v in config.items() if k.isupper()},
    }
    ints = _int_args(kernel_name, spec)
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            if name not in constexpr_values:
                raise KeyError(f"{kernel_name}: no value for constexpr {name}; update aot_compile.py")
            signature[name] = "constexpr"
            constexprs[name] = constexpr_values[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in ints:
            value = ints[name]
            if value == 1:  # JITFunction specializes 1 to a constant
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{kernel_name}: unknown argument {name}; update aot_compile.py")
    unused = set(constexpr_values) - set(constexprs)
    if unused:
        raise KeyError(f"{kernel_name} has no constexpr {sorted(unused)}; update aot_compile.py")
    return signature, constexprs, attrs


def _ast_source(fn, signature, constexprs, attrs):
    from triton.compiler import ASTSource

    try:  # Triton >= 3.3 (3.6 on the GPU machines, 3.8 here)
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    except TypeError:  # older spelling
        return ASTSource(fn=fn, signature=signature, constants=constexprs, attrs=attrs)


def _gpu_target(arch: int):
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # pragma: no cover - older Triton
        from triton.compiler.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def compile_case(kernel_name: str, arch: int, dtype: str, act: str, flags: dict[str, Any], config: Any,
                 spec: str = "aligned") -> dict[str, Any]:
    """Compile one case in this process; never raises for a compile failure (``ok=False``).

    Raises ``RuntimeError`` if the kernel modules were imported under ``TRITON_INTERPRET=1``.
    """
    import triton

    config = config_dict(config)
    result: dict[str, Any] = {
        "kernel": kernel_name, "arch": arch, "dtype": dtype, "act": act, "flags": dict(flags),
        "config": config, "spec": spec, "ok": False, "error": None, "shared_bytes": None,
        "shared_limit": SHARED_LIMIT.get(arch), "tensor_core_instructions": None, "tensor_core_kind": None,
        "registers": None, "spill_bytes": None, "seconds": None,
    }
    fn = _load_kernel(kernel_name)
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = _signature(fn, kernel_name, dtype, act, flags, config, spec)
        options = {k: v for k, v in config.items() if not k.isupper()}
        compiled = triton.compile(_ast_source(fn, signature, constexprs, attrs), target=_gpu_target(arch),
                                  options=options)
        meta = compiled.metadata
        shared = int(meta.shared)
        counts = tensor_core_counts(compiled.asm["ptx"])
        result.update(shared_bytes=shared, tensor_core_instructions=sum(counts.values()),
                      tensor_core_kind="+".join(k for k, v in counts.items() if v) or None,
                      tensor_core_counts=counts, **resource_usage(compiled.asm.get("cubin")))
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and shared > limit:
            result["error"] = f"{shared} bytes of shared memory > {limit} on sm_{arch}: would never launch"
        else:
            result["ok"] = True
    except Exception as e:  # noqa: BLE001 - a compile error of any kind is the result
        msg = f"{type(e).__name__}: {e}"
        result["error"] = msg if len(msg) < 4000 else msg[:4000] + " ..."
        result["traceback"] = traceback.format_exc(limit=8)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _compile_case_dict(c: dict[str, Any]) -> dict[str, Any]:
    return compile_case(c["kernel"], c["arch"], c["dtype"], c["act"], c["flags"], c["config"],
                        c.get("spec", "aligned"))


def _cost(c: dict[str, Any]) -> float:
    """Rough relative compile time of a case (measured on 2 CPU cores, Triton 3.8)."""
    cost = 2.0 if c["kernel"] in ("fused_mlp", "fused_gated_linear") else 1.0  # two dots per K step
    if c["flags"].get("input_precision") == "ieee":
        cost *= 2.5
    blocks = [v for k, v in c["config"].items() if k.startswith("BLOCK_")]
    size = 1
    for b in blocks[:2]:
        size *= b
    return cost * (1.0 + size / 16384)


def _worker_init(cache_dir: Optional[str]) -> None:
    # Before anything imports triton or the kernels: compile for real, never interpret.
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir


def run_cases(case_list: list[dict[str, Any]], jobs: Optional[int] = None, cache_dir: Optional[str] = None,
              progress: bool = False) -> list[dict[str, Any]]:
    """Compile ``case_list`` in ``jobs`` fresh worker processes (default: one per CPU core).

    Workers are spawned, not forked, and drop ``TRITON_INTERPRET``, so the calling process may
    have Triton in interpreter mode. Results come back in the order of ``case_list``.
    """
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(case_list) or 1))
    # The workers import this module by name: make sure they find it (a no-op for the CLI).
    here = os.path.dirname(os.path.abspath(__file__))
    if __name__ != "__main__" and here not in sys.path:
        sys.path.append(here)
    ctx = multiprocessing.get_context("spawn")
    results: list[Optional[dict[str, Any]]] = [None] * len(case_list)
    # Slowest first (IEEE fp32 dots unroll into FMAs, the MLP has two), so no worker is left
    # with a long compile at the end.
    order = sorted(range(len(case_list)), key=lambda i: -_cost(case_list[i]))
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                                initargs=(cache_dir,)) as pool:
        futures = {pool.submit(_compile_case_dict, case_list[i]): i for i in order}
        for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as e:  # worker died (e.g. a crash inside MLIR) or refused
                c = case_list[i]
                results[i] = {**c, "ok": False, "error": f"{type(e).__name__}: {e}", "shared_bytes": None,
                              "shared_limit": SHARED_LIMIT.get(c["arch"]), "tensor_core_instructions": None,
                              "tensor_core_kind": None, "seconds": None}
            if progress:
                r = results[i]
                print(f"[{done}/{len(case_list)}] {'ok  ' if r['ok'] else 'FAIL'} {case_id(r)} "
                      f"({r['seconds']} s)", file=sys.stderr, flush=True)
    return results  # type: ignore[return-value]


def backend_unavailable() -> Optional[str]:
    """Why CUDA code cannot be compiled here (``None`` when it can): no Triton, no NVIDIA
    backend, or no working ``ptxas``. Checks the prerequisites only, not the kernels."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return f"triton has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
    except ImportError:  # another Triton layout: let the compile itself tell
        return None
    try:
        try:
            get_ptxas_version()
        except TypeError:  # a Triton whose get_ptxas_version takes the arch
            get_ptxas_version(80)
    except Exception as e:  # noqa: BLE001
        return f"ptxas is not usable: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

_COLUMNS = ("kernel", "arch", "dtype", "act", "flags", "config", "shared", "limit", "tc instr", "regs", "spill",
            "ok", "s")


def _row(r: dict[str, Any]) -> list[str]:
    tc = r.get("tensor_core_instructions")
    tc_s = "-" if tc is None else (f"{tc} {r['tensor_core_kind']}" if tc else "0")
    return [r["kernel"], f"sm_{r['arch']}", r["dtype"], r["act"], flags_label(r["flags"], r["dtype"]),
            config_label(r["config"]),
            "-" if r.get("shared_bytes") is None else str(r["shared_bytes"]),
            str(r.get("shared_limit") or "-"), tc_s,
            "-" if r.get("registers") is None else str(r["registers"]),
            "-" if r.get("spill_bytes") is None else str(r["spill_bytes"]), "ok" if r["ok"] else "FAIL",
            "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"]


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    rows = [_row(r) for r in results]
    if markdown:
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(_COLUMNS)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    failures = [r for r in results if not r["ok"]]
    if failures:
        lines.append("")
        lines.append(f"{len(failures)} failure(s):")
        lines += [f"- {case_id(r)}: {r['error']}" for r in failures]
    return "\n".join(lines)


def summarize(results: list[dict[str, Any]]) -> str:
    lines = []
    for kernel in dict.fromkeys(r["kernel"] for r in results):
        for arch in sorted({r["arch"] for r in results if r["kernel"] == kernel}):
            rs = [r for r in results if r["kernel"] == kernel and r["arch"] == arch]
            shared = [r["shared_bytes"] for r in rs if r.get("shared_bytes") is not None]
            tc = [r["tensor_core_instructions"] for r in rs if r.get("tensor_core_instructions")]
            secs = [r["seconds"] for r in rs if r.get("seconds") is not None]
            spills = [r["spill_bytes"] for r in rs if r.get("spill_bytes")]
            lines.append(
                f"{kernel} sm_{arch}: {len(rs)} cases, {sum(r['ok'] for r in rs)} ok; shared "
                f"{min(shared, default=0)}-{max(shared, default=0)} B (limit {SHARED_LIMIT.get(arch)}); "
                f"tensor-core instr {min(tc, default=0)}-{max(tc, default=0)} where used; "
                f"register spills in {len(spills)} (max {max(spills, default=0)} B/thread); "
                f"{sum(secs):.0f} s compile"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="config x dtype x act x flags cross product")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities")
    parser.add_argument("--kernel", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--sweep-arch", type=int, nargs="+", default=None,
                        help="reduced set: archs that get the dtype x act x flags sweep (default: all of --arch)")
    parser.add_argument("--spec", choices=SPECS, default="aligned",
                        help="integer specialization of the launch: model shapes (aligned) or odd sizes")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores)")
    parser.add_argument("--cache-dir", default=None, help="TRITON_CACHE_DIR for the workers (e.g. an empty "
                        "temporary directory to time a cold compile)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--md", metavar="PATH", help="write the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    args = parser.parse_args(argv)

    why = backend_unavailable()
    if why:
        print(f"cannot compile for CUDA here: {why}", file=sys.stderr)
        return 2
    import triton

    case_list = cases(args.full, archs=args.arch, kernels=args.kernel, sweep_archs=args.sweep_arch, spec=args.spec)
    start = time.perf_counter()
    results = run_cases(case_list, jobs=args.jobs, cache_dir=args.cache_dir, progress=not args.quiet)
    wall = time.perf_counter() - start
    table = format_table(results)
    summary = summarize(results)
    header = (f"AOT compile, triton {triton.__version__}, {'full' if args.full else 'reduced'} set, "
              f"spec {args.spec}: {len(results)} cases, {sum(r['ok'] for r in results)} ok, {wall:.0f} s wall")
    print(table)
    print()
    print(header)
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
            from _report import provenance  # commit, CPU model, versions, command: as every results file

            json.dump({"triton": triton.__version__, "full": args.full, "spec": args.spec, "wall_seconds": wall,
                       "environment": provenance("cpu (ahead-of-time compile, no GPU used)"),
                       "results": results}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# {header}\n\n```\n{summary}\n```\n\n{format_table(results, markdown=True)}\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
