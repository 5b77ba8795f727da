"""`dalpsr upscale --engine dat`: the regression path alone (a `DATRestorer`, no diffusion weights).

Called by `dalpsr.cli_upscale.run_upscale` with the job list it built (inputs, outputs, existing ones skipped),
so both engines share the batch semantics: atomic writes, bad files reported and skipped, exit codes
0 (all done), 1 (some files failed), 2 (no model / bad arguments).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

DAT_MODEL_ENV = "DALPSR_DAT_MODEL"
DEFAULT_DAT_SUBFOLDER = "degradation_tiny"


@dataclass
class DatUpscaleSettings:
    """Run settings of `dalpsr upscale --engine dat`, written as JSON beside the outputs."""

    model: str
    engine: str = "dat"
    model_scale: int = 4
    upscale: float = 4
    fusion: bool = False
    tile_size: int | None = None
    tile_overlap: int = 16
    dtype: str = "auto"
    device: str = "auto"


def resolve_dat_model(args) -> str:
    """Which restorer to load: --dat-model, $DALPSR_DAT_MODEL, then the small model shipped in `dalpsr.weights`."""
    if getattr(args, "dat_model", None):
        return args.dat_model
    env = os.environ.get(DAT_MODEL_ENV)
    if env:
        return env
    from importlib.resources import files

    shipped = Path(str(files("dalpsr.weights") / DEFAULT_DAT_SUBFOLDER))
    if (shipped / "config.json").is_file() or (shipped / "restorer" / "config.json").is_file():
        return str(shipped)
    raise FileNotFoundError(
        f"No DAT restorer found. Looked at: --dat-model (not given), ${DAT_MODEL_ENV} (unset), {shipped} (absent). "
        "Pass `--dat-model PATH`: training/train_dat.py output, a DATRestorer or DAT folder, or an official DAT "
        "checkpoint (.pth / .safetensors, e.g. DAT_light_x4.pth from zhengchen1999/DAT)."
    )


def lr_tiling(args, scale: int, height: int, width: int) -> tuple[int | None, int]:
    """(LR tile size or None, LR overlap) from --tile-size / --tile-overlap, which are in output pixels."""
    if args.tile_size is not None:
        if args.tile_size < scale:
            raise ValueError(f"`--tile-size` must be at least the model scale {scale}; got {args.tile_size}.")
        tile = args.tile_size // scale
    else:
        tile = 256 if max(height, width) > 256 else None
    if tile is None:
        return None, 0
    overlap = 16 if args.tile_overlap is None else args.tile_overlap // scale
    return tile, min(overlap, tile // 2)


def run_dat_upscale(args, todo: list[tuple[Path, Path]], skipped: int, out_dir: Path) -> int:
    """Super-resolve `todo` (input, output) pairs with the restorer; `skipped` existing outputs are reported."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from dalpsr.image_io import load_image, save_image_atomic, tensor_to_pil
    from dalpsr.models.fusion import load_restorer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    autocast = dtypes.get(args.dtype, torch.float16 if args.dtype == "auto" and device.startswith("cuda") else None)
    if args.upscale <= 0:
        print(f"error: `--upscale` must be > 0; got {args.upscale}.", file=sys.stderr)
        return 2
    try:
        source = resolve_dat_model(args)
        model, encoder = load_restorer(source, device=device)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    settings = DatUpscaleSettings(
        model=source,
        model_scale=model.scale,
        upscale=args.upscale,
        fusion=model.needs_features,
        tile_size=args.tile_size,
        tile_overlap=16 if args.tile_overlap is None else args.tile_overlap,
        dtype=args.dtype,
        device=device,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dalpsr_upscale.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    failures: list[tuple[Path, str]] = []
    with open(out_dir / "dalpsr_upscale.jsonl", "a", encoding="utf-8") as log:
        for src, dst in tqdm(todo, desc="upscale (dat)", unit="img"):
            try:
                image = load_image(src)
                lr = image.rgb[None].to(device)
                h, w = lr.shape[-2:]
                tile, overlap = lr_tiling(args, model.scale, h, w)
                sr = model.super_resolve(lr, encoder=encoder, tile_size=tile, tile_overlap=overlap, dtype=autocast)
                out_h, out_w = round(h * args.upscale), round(w * args.upscale)
                if sr.shape[-2:] != (out_h, out_w):
                    down = out_h < sr.shape[-2]
                    sr = F.interpolate(sr, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=down)
                alpha = image.alpha
                if alpha is not None:
                    alpha = F.interpolate(alpha[None], size=(out_h, out_w), mode="bicubic", align_corners=False)[0]
                    alpha = alpha.cpu()
                pil = tensor_to_pil(sr[0].float().cpu(), alpha)
                if args.format == "jpg" and pil.mode == "RGBA":
                    pil = pil.convert("RGB")
                save_image_atomic(pil, dst)
                record = {"input": str(src), "output": str(dst), "engine": "dat", "size": [out_h, out_w]}
                log.write(json.dumps(record) + "\n")
                log.flush()
            except Exception as err:  # a bad file must not stop the batch
                failures.append((src, f"{type(err).__name__}: {err}"))
                tqdm.write(f"failed: {src}: {type(err).__name__}: {err}", file=sys.stderr)
    done = len(todo) - len(failures)
    print(f"upscaled {done}, skipped {skipped} existing, failed {len(failures)} -> {out_dir}")
    for src, why in failures:
        print(f"  failed: {src}: {why}", file=sys.stderr)
    return 1 if failures else 0
