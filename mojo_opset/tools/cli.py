"""``mojo-opset`` entry point: ``info``, ``compare`` and ``bench`` subcommands."""
from __future__ import annotations

import argparse
import logging
import sys

from .._version import __version__


def build_parser() -> argparse.ArgumentParser:
    from . import bench, compare, info

    p = argparse.ArgumentParser(
        prog="mojo-opset",
        description="Mixture-of-Experts operators for PyTorch: inspect backends, compare them with the "
                    "reference, benchmark them.")
    p.add_argument("--version", action="version", version=f"mojo-opset {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,compare,bench}")
    info.add_parser(sub)
    compare.add_parser(sub)
    bench.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # fallbacks are reported by the tools themselves; keep the once-per-reason warnings off the report
    log = logging.getLogger("mojo_opset")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into head
        return 0
    finally:
        log.setLevel(level)
