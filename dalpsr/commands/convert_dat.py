"""`dalpsr convert-dat`: official DAT checkpoint -> diffusers folder."""

from __future__ import annotations

import argparse

from dalpsr.loaders.dat import convert_dat_checkpoint


def run_convert_dat(args: argparse.Namespace) -> int:
    try:
        out = convert_dat_checkpoint(args.src, args.dst, param_key=args.param_key, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        print(f"convert-dat: {err}")
        return 1
    print(f"wrote {out} (load with DAT.from_pretrained)")
    return 0


def add_commands(subparsers) -> None:
    """Register `dalpsr convert-dat`."""
    parser = subparsers.add_parser(
        "convert-dat",
        help="convert an official DAT checkpoint (.pth/.safetensors) to a config.json + safetensors folder",
        description="Convert an official DAT checkpoint (zhengchen1999/DAT, any variant and scale; the "
        "architecture is inferred from the weights) to a diffusers folder loadable by DAT.from_pretrained.",
    )
    parser.add_argument("src", help="checkpoint file (.pth with params/params_ema, or .safetensors)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--param-key", default=None, help="checkpoint entry to read (default: params_ema, params)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run_convert_dat)
