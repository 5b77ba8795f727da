"""The `dalpsr` command line: one sub-command per job, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from dalpsr import cli_caption, cli_degradation, cli_upscale
    from dalpsr.degradations import cli as degradations_cli
    from dalpsr.evaluation import cli as evaluation_cli
    from dalpsr.weights import cli as weights_cli
    from dalpsr.weights import manifest as weights_manifest
    from dalpsr.weights import seesr as seesr_weights

    parser = argparse.ArgumentParser(
        prog="dalpsr", description="Real-world image super-resolution with a diffusion prior."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli_upscale.add_commands(subparsers)
    cli_caption.add_commands(subparsers)
    cli_degradation.add_commands(subparsers)
    degradations_cli.add_commands(subparsers)
    weights_cli.add_commands(subparsers)
    weights_manifest.add_commands(subparsers)
    seesr_weights.add_commands(subparsers)
    evaluation_cli.add_commands(subparsers)
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
