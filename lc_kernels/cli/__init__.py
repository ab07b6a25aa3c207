"""``lc-kernels demo | plan | bench``."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "demo": ("lc_kernels.cli.demo", "train, plan and collapse an MLP on scikit-learn's digits"),
    "plan": ("lc_kernels.cli.plan", "print the collapse plan of a saved model"),
    "bench": ("lc_kernels.cli.bench", "throughput of collapsed and fused MLPs vs nn.Sequential"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with ``only``, import just that subcommand's module (fast start-up)."""
    parser = argparse.ArgumentParser(prog="lc-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=mod)
        if only in (None, name):
            importlib.import_module(mod).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
