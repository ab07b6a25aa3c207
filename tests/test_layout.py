"""The package's layout: every import points down the stack, no cycles, and a lean ``import lc_kernels``."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lc_kernels

ROOT = Path(lc_kernels.__file__).parent

# Lower ranks sit lower in the stack; a module may import its own rank or below, never above.
RANKS = {
    "_version": 0, "_config": 0, "kernels": 0,
    "ops": 1,
    "nn": 2,
    "regularizer": 3, "timing": 3, "testing": 3, "integrations": 3,
    "algebra": 4,
    "planning": 5,
    "transforms": 6,
    "finetune": 7, "healing": 7,
    "compress": 8, "speedup": 8, "warmup": 8,
    "": 9,  # lc_kernels/__init__.py, the public surface
    "cli": 10,
}
# Imported inside a function on purpose: Triton is loaded only when a kernel first runs.
LAZY_OK = {"lc_kernels.kernels", "lc_kernels.kernels.fused_linear", "lc_kernels.kernels.fused_mlp",
           "lc_kernels.kernels.fused_gated_linear"}


def _module_name(path: Path) -> str:
    parts = ["lc_kernels", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported lc_kernels module, inside a function?, line) for every import in ``path``."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}") else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == "lc_kernels" or t.startswith("lc_kernels."):
                out.append((t, id(node) in nested, node.lineno))
    return out


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


FILES = sorted(ROOT.rglob("*.py"))


def test_every_file_has_a_rank():
    assert {_group(_module_name(p)) for p in FILES} <= set(RANKS), "add the new top-level module to RANKS"


def test_imports_point_down():
    bad = []
    for path in FILES:
        me = _module_name(path)
        for target, lazy, line in _imports(path):
            src, dst = RANKS[_group(me)], RANKS[_group(target)]
            where = f"{path.relative_to(ROOT.parent)}:{line}: {me} imports {target}"
            if dst > src:
                bad.append(f"{where} (upward: rank {src} -> {dst})")
            elif lazy and target not in LAZY_OK:
                bad.append(f"{where} inside a function (import at the top, or explain in LAZY_OK)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {_module_name(p): {t for t, _, _ in _imports(p)} for p in FILES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, ()):
            if n == m:
                continue
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_import_is_lean():
    code = ("import sys, lc_kernels, lc_kernels.ops\n"
            "heavy = [m for m in ('triton', 'torch._inductor', 'timm', 'transformers', 'safetensors', 'sklearn') "
            "if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import lc_kernels loaded {out.stdout.strip()}"


def test_eager_cpu_use_stays_lean():
    code = ("import sys, torch, lc_kernels as lc\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))\n"
            "lc.prepare_(m, alpha_init=1.0); m.eval(); x = torch.randn(3, 8); y = m(x)\n"
            "lc.collapse_(m); m(x).sum()\n"
            "print(','.join(n for n in ('triton', 'torch._inductor') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in __import__("os").environ.items()
                              if k not in ("LC_KERNELS_FORCE_TRITON", "TRITON_INTERPRET")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"eager CPU use loaded {out.stdout.strip()}"
