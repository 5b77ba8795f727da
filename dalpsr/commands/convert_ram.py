"""`dalpsr convert-ram`: RAM (+ SeeSR DAPE) checkpoint → a compact `RAMImageEncoder` folder."""

from __future__ import annotations

from dalpsr.loaders.seesr import convert_ram_encoder
from dalpsr.runtime import DTYPES


def add_commands(subparsers) -> None:
    """Register `dalpsr convert-ram`."""
    p = subparsers.add_parser(
        "convert-ram",
        help="RAM (+ SeeSR DAPE) checkpoint -> compact RAMImageEncoder folder (Swin-L + projection only)",
        description="Keep only RAM's Swin-L visual encoder and image_proj (timm layout), merge SeeSR's DAPE LoRA "
        "when given, and write config.json + safetensors + NOTICE.md.",
    )
    p.add_argument("ram", help="ram_swin_large_14m.pth")
    p.add_argument("output", help="output folder")
    p.add_argument("--dape", help="SeeSR's DAPE.pth, merged into the Swin")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of the .pth files")
    p.set_defaults(func=run_convert_ram)


def run_convert_ram(args) -> int:
    try:
        out = convert_ram_encoder(
            args.ram,
            args.output,
            dape=args.dape,
            dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
            trust_pickle=args.trust_pickle,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"convert-ram: {err}")
        return 1
    print(f"wrote {out} (use as `ram=` in DaLPSRPipeline.from_seesr, or RAMImageEncoder.from_pretrained)")
    return 0
