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


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="dalpsr", description="Real-world image super-resolution with a diffusion prior."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dalpsr.commands.{name}").add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # diffusers imports bitsandbytes when it is installed (pyiqa depends on it); on CPUs with AVX512-BF16 its import
    # warns that an optional CPU 4-bit kernel is missing, on every command. dalpsr quantises only on CUDA.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
