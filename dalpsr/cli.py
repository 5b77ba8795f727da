"""The `dalpsr` command line: one sub-command per module of `dalpsr.commands`."""

from __future__ import annotations

import argparse
import logging
import sys

COMMANDS = (
    "upscale",
    "caption",
    "describe",
    "evaluate_degradation",
    "make_pairs",
    "eval",
    "compare",
    "weights",
    "convert_dat",
    "convert_ncnn",
    "convert_ram",
    "convert_seesr",
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every sub-command, or of `command` alone (its module is the only one imported: the
    commands import their models, and a run should pay only for its own)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="dalpsr", description="Real-world image super-resolution with a diffusion prior."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS if command is None else (command,):
        importlib.import_module(f"dalpsr.commands.{name}").add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # diffusers imports bitsandbytes when it is installed (pyiqa depends on it); on CPUs with AVX512-BF16 its import
    # warns that an optional CPU 4-bit kernel is missing, on every command. dalpsr quantises only on CUDA.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argv[0] if argv and not argv[0].startswith("-") else ""
    module = first.replace("-", "_")
    # a known sub-command builds only its own parser; anything else (help, a typo) builds all to list them
    parser = build_parser(module if module in COMMANDS and first == module.replace("_", "-") else None)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
