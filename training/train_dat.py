"""Train a DAT restorer (DAT + degradation-feature fusion) on HR folders degraded on the fly (Accelerate).

HR crops are degraded in the loop with the second-order (Real-ESRGAN style) synthesis; the LR goes through
the frozen degradation encoder (the shared feature stack) and the `DATRestorer`. Losses: L1, plus LPIPS
when its weight files are on disk (pyiqa, never downloaded; skipped with a logged message otherwise).
An EMA of the weights is kept, validated and saved. Validation: PSNR/SSIM on the Y channel (BT.601),
4-pixel border cropped, on a paired folder (`hr/` + `lr_x{scale}/`, or a `dalpsr make-pairs` folder),
with the bicubic baseline beside it.

    accelerate launch training/train_dat.py --model_config train_dat_light_tiny.json \
        --degradation_encoder DEGRADATION_RUN --train_data_dir HR_DIR \
        --validation_data_dir ../shared/data/paired/RealSR --output_dir out/dat_light

Output: `restorer/` (EMA weights), `degradation_encoder/` (the frozen encoder it was trained with),
`checkpoint-N/`, `validation/step-N.json`, `train_args.json`, `restorer_data.json`;
`dalpsr upscale --engine dat --dat-model OUTPUT_DIR` runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader

from dalpsr.training_utils import (
    COUNT_ARGUMENTS,
    EpochPermutation,
    add_optimization_arguments,
    add_run_arguments,
    log_validation,
    parse_with_config,
    read_model_config,
    require_positive,
    resume_state,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

CONFIG_SECTIONS = {"dat", "fusion", "encoder", "data"}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model_config",
        default="train_dat_light_tiny.json",
        help="JSON with dat/fusion/encoder/data sections: a path, or a file name in configs/",
    )
    p.add_argument("--pretrained_dat", default=None, help="start from an official DAT checkpoint or DAT folder")
    p.add_argument(
        "--degradation_encoder",
        default=None,
        help="frozen DegradationEncoder folder (or a folder holding degradation_encoder/) for the fusion features",
    )
    p.add_argument("--no_fusion", action="store_true", help="train plain DAT (no encoder, no fusion blocks)")
    p.add_argument("--freeze_dat", action="store_true", help="train only the fusion blocks and the projection")
    p.add_argument("--train_data_dir", nargs="+", required=True, help="folder(s) of HR images")
    p.add_argument(
        "--validation_data_dir", default=None, help="paired folder: hr/ + lr_x{scale}/, or metadata.jsonl pairs"
    )
    p.add_argument("--validation_samples", type=int, default=20, help="first N pairs (sorted by name)")
    p.add_argument("--validation_tile_size", type=int, default=None, help="LR tile size for validation inference")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hr_size", type=int, default=None, help="HR crop size (default: config data.hr_size)")
    p.add_argument("--scale", type=int, default=None, help="SR scale (default: config data.scale)")
    p.add_argument("--degradation", default=None, help="degradation preset (default: config data.degradation)")
    p.add_argument("--crops_per_image", type=int, default=8, help="random crops per image per epoch")
    p.add_argument("--recursive", action="store_true", help="include sub-folders of the data folders")
    add_optimization_arguments(p)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--l1_weight", type=float, default=1.0)
    p.add_argument("--lpips_weight", type=float, default=0.1, help="used only when the LPIPS weight files exist")
    p.add_argument("--iqa_weights_dir", default=None, help="TORCH_HOME-style folder with hub/pyiqa (LPIPS)")
    p.add_argument("--ema_decay", type=float, default=0.999, help="0 disables the EMA")
    add_run_arguments(p)
    args = parse_with_config(p, input_args)
    require_positive(args, COUNT_ARGUMENTS)
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1); got {args.ema_decay}.")
    if args.l1_weight < 0 or args.lpips_weight < 0:
        raise ValueError(f"`--l1_weight`/`--lpips_weight` must be >= 0; got {args.l1_weight}, {args.lpips_weight}.")
    if args.no_fusion and args.degradation_encoder:
        raise ValueError("`--no_fusion` and `--degradation_encoder` exclude each other.")
    if args.freeze_dat and not args.pretrained_dat:
        raise ValueError("`--freeze_dat` needs `--pretrained_dat` (a frozen random DAT cannot learn).")
    return args


def load_model_config(name_or_path: str) -> dict:
    """A run config from a path, or by file name from the configs shipped in `configs/`."""
    path, cfg = read_model_config(name_or_path)
    unknown = set(cfg) - CONFIG_SECTIONS
    if unknown or "dat" not in cfg:
        raise ValueError(
            f"`--model_config` {path} needs a 'dat' section (and optional 'fusion', 'encoder', 'data'); "
            f"got {sorted(cfg)}."
        )
    return cfg


def dat_config_from(section: dict) -> dict:
    """DAT arguments from a config section: `{"preset": name, "scale": s, **overrides}` or explicit arguments."""
    from dalpsr.models.dat import DAT

    section = dict(section)
    if "preset" in section:
        name, scale = section.pop("preset"), section.pop("scale", 4)
        return {**DAT.preset_config(name, scale), **section}
    return section


def paired_files(root: str | os.PathLike, scale: int) -> list[tuple[str, Path, Path]]:
    """(name, hr path, lr path) of a paired folder: `metadata.jsonl` pairs, or `hr/` + `lr_x{scale}/` by file name."""
    from dalpsr.image_io import list_images

    root = Path(root)
    if (root / "metadata.jsonl").is_file():
        from dalpsr.data.pairs import PairsFolder

        records = PairsFolder(root).records
        return sorted((r.get("name", Path(r["lr"]).stem), root / r["hr"], root / r["lr"]) for r in records)
    hr_dir, lr_dir = root / "hr", root / f"lr_x{scale}"
    if not hr_dir.is_dir() or not lr_dir.is_dir():
        raise ValueError(
            f"`--validation_data_dir` {root} must hold metadata.jsonl, or hr/ and lr_x{scale}/ folders with the "
            "same file names."
        )
    lrs = {p.name: p for p in list_images([lr_dir])}
    pairs = sorted((p.stem, p, lrs[p.name]) for p in list_images([hr_dir]) if p.name in lrs)
    if not pairs:
        raise ValueError(f"`--validation_data_dir` {root}: no file name is in both hr/ and lr_x{scale}/.")
    return pairs


def build_lpips(weight: float, weights_dir: str | None, device):
    """pyiqa LPIPS as a loss when `weight` > 0 and its weight files exist; else None (with the reason logged)."""
    if weight == 0:
        return None
    try:
        import pyiqa

        from dalpsr.evaluation.weights import missing_message, missing_weight_files, offline_pyiqa
    except ImportError:
        logger.info("LPIPS loss skipped: pyiqa is not installed (`pip install dalpsr[metrics]`); training with L1.")
        return None
    missing = missing_weight_files("lpips", weights_dir)
    if missing:
        logger.info(
            f"LPIPS loss skipped, training with L1 only (here the folder is `--iqa_weights_dir`): "
            f"{missing_message('lpips', missing)}"
        )
        return None
    with offline_pyiqa(weights_dir, "lpips"):
        lpips = pyiqa.create_metric("lpips", as_loss=True, device=device)
    lpips.requires_grad_(False).eval()
    logger.info(f"LPIPS loss on (weight {weight}).")
    return lpips


def load_encoder(args: argparse.Namespace, cfg: dict):
    """The frozen encoder for the fusion features, or None for plain DAT."""
    from dalpsr.loaders.degradation import load_degradation_encoder
    from dalpsr.models.degradation_encoder import DegradationEncoder

    if args.no_fusion:
        return None
    if args.degradation_encoder:
        encoder = load_degradation_encoder(args.degradation_encoder)
    elif cfg.get("encoder"):
        logger.warning(
            "No `--degradation_encoder`: building the config's encoder with RANDOM weights; its features are a fixed "
            "random function of the LR (use this for tests, a trained encoder for real runs)."
        )
        encoder = DegradationEncoder(**cfg["encoder"])
    elif cfg.get("fusion") is not None:
        raise ValueError(
            "The config has a 'fusion' section but no encoder was given: pass `--degradation_encoder DIR` "
            "(e.g. training/train_degradation_encoder.py output) or `--no_fusion` for plain DAT."
        )
    else:
        return None
    return encoder.requires_grad_(False).eval()


def main(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from dalpsr.data.pairs import HRFolderPairs
    from dalpsr.degradations.config import preset
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.image_io import atomic_write_bytes, list_images, usable_images
    from dalpsr.loaders.dat import load_dat_checkpoint
    from dalpsr.loaders.degradation import ENCODER_SUBFOLDER
    from dalpsr.loaders.restorers import RESTORER_SUBFOLDER
    from dalpsr.models.fusion import DATRestorer
    from dalpsr.runtime import derive_seed, mix_seed

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    cfg = load_model_config(args.model_config)
    data_cfg = cfg.get("data", {})
    hr_size = args.hr_size or data_cfg.get("hr_size", 256)
    scale = args.scale or data_cfg.get("scale", 4)
    degradation = args.degradation or data_cfg.get("degradation", "realesrgan")
    degradation_config = preset(degradation, scale=scale)

    encoder = load_encoder(args, cfg)
    fusion = dict(cfg.get("fusion") or {})
    if encoder is None:
        fusion = {"fusion_layers": []}
    context_dim = encoder.embed_dim if encoder is not None else 512
    if args.pretrained_dat:
        model = DATRestorer.from_dat(load_dat_checkpoint(args.pretrained_dat), context_dim=context_dim, **fusion)
    else:
        model = DATRestorer(dat_config=dat_config_from(cfg["dat"]), context_dim=context_dim, **fusion)
    if model.scale != scale:
        raise ValueError(f"The DAT upscales ×{model.scale} but the data scale is ×{scale}; make them agree.")
    if args.freeze_dat:
        model.dat.requires_grad_(False)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info(
        f"DATRestorer ×{scale}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters "
        f"({sum(p.numel() for p in params) / 1e6:.3f} M trained), fusion before groups {model.fusion_groups}."
    )

    parts = []
    for root in args.train_data_dir:
        paths, skipped = usable_images(list_images([root], recursive=args.recursive), hr_size)
        for path, reason in skipped:
            logger.warning(f"skipping {path}: {reason}")
        if not paths:
            continue
        pairs = HRFolderPairs(
            root,
            size=hr_size,
            scale=scale,
            config=degradation_config,
            crops_per_image=args.crops_per_image,
            seed=args.seed,
            degrade=False,
            paths=paths,
        )
        parts.append(pairs)
    if not parts:
        raise ValueError(f"`--train_data_dir` {args.train_data_dir} has no image of at least {hr_size} pixels.")
    dataset = ConcatDataset(parts)
    sampler = EpochPermutation(len(dataset), args.seed)
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        drop_last=len(dataset) >= args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    val_pairs = []
    if args.validation_data_dir:
        val_pairs = paired_files(args.validation_data_dir, scale)[: args.validation_samples]

    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    net = accelerator.unwrap_model(model)
    if encoder is not None:
        encoder.to(accelerator.device)
    ema = None
    if args.ema_decay > 0:
        ema = EMAModel(net.parameters(), decay=args.ema_decay, foreach=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    lpips = build_lpips(args.lpips_weight, args.iqa_weights_dir, accelerator.device)

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("dat_restorer", config={k: str(v) for k, v in vars(args).items()})
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / "train_args.json", (json.dumps(vars(args), indent=2) + "\n").encode())

    global_step = resume_state(accelerator, output_dir, args.resume_from_checkpoint)
    first_epoch = global_step // steps_per_epoch
    resume_step = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    bicubic_scores: dict[str, dict[str, float]] = {}

    def validate(step: int) -> None:
        if not val_pairs or not accelerator.is_main_process:
            return
        if ema is not None:
            ema.store(net.parameters())
            ema.copy_to(net.parameters())
        net.eval()
        try:
            metrics = evaluate_pairs(
                net, encoder, val_pairs, scale, accelerator.device, args.validation_tile_size, bicubic_scores
            )
        finally:
            net.train()
            if ema is not None:
                ema.restore(net.parameters())
        scalars = {**metrics["mean"], **{f"bicubic_{k}": v for k, v in metrics["bicubic"].items()}}
        log_validation(accelerator, output_dir, step, metrics, scalars)

    model.train()
    micro_step = global_step * args.gradient_accumulation_steps
    done = global_step >= args.max_train_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        for part in parts:
            part.set_epoch(epoch)
        epoch_loader = loader
        if epoch == first_epoch and resume_step:
            from accelerate import skip_first_batches

            epoch_loader = skip_first_batches(loader, resume_step)
        # accelerate re-seeds the sampler from the loader's own counter on each pass: pin it to the epoch
        epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            # stochastic depth draws from the global RNG: seed it per step so a resumed run repeats the same draws
            torch.manual_seed(mix_seed(args.seed, micro_step) * 64 + accelerator.process_index)
            micro_step += 1
            with accelerator.accumulate(model):
                # the LR's degradation seed derives from the crop seed (which already placed the crop)
                seeds = [derive_seed(int(s), "degradation", 0) for s in batch["seed"]]
                hr = batch["hr"].float()
                lr = degrade(hr.cpu(), degradation_config, scale=scale, seeds=seeds).lr.to(hr.device)
                features = None
                if encoder is not None:
                    with torch.no_grad():
                        features = encoder(encoder.preprocess(lr).to(hr.device))
                sr = model(lr, features)
                loss_l1 = F.l1_loss(sr.float(), hr)
                loss = args.l1_weight * loss_l1
                loss_lpips = torch.zeros((), device=hr.device)
                if lpips is not None:
                    loss_lpips = lpips(sr.float().clamp(0, 1), hr).mean()
                    loss = loss + args.lpips_weight * loss_lpips
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.step(net.parameters())
            logs = {
                "loss": loss.item(),
                "loss_l1": loss_l1.item(),
                "loss_lpips": loss_lpips.item(),
                "lr": lr_scheduler.get_last_lr()[0],
            }
            accelerator.log(logs, step=global_step)
            if global_step % args.logging_steps == 0:
                logger.info(f"step {global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step % args.validation_steps == 0:
                validate(global_step)
            if global_step >= args.max_train_steps:
                done = True
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if global_step % args.validation_steps:
            validate(global_step)
        if ema is not None:
            ema.copy_to(net.parameters())
        net.save_pretrained(output_dir / RESTORER_SUBFOLDER)
        if encoder is not None:
            encoder.save_pretrained(output_dir / ENCODER_SUBFOLDER)
        data = {"hr_size": hr_size, "scale": scale, "degradation": degradation, "ema": ema is not None}
        atomic_write_bytes(output_dir / "restorer_data.json", (json.dumps(data, indent=2) + "\n").encode())
    accelerator.end_training()
    return output_dir


@torch.no_grad()
def evaluate_pairs(
    net,
    encoder,
    pairs: list[tuple[str, Path, Path]],
    scale: int,
    device,
    tile_size: int | None,
    bicubic_cache: dict[str, dict[str, float]] | None = None,
) -> dict:
    """PSNR/SSIM (Y of BT.601 YCbCr, border 4, 8-bit) of the restorer and of bicubic on paired images.

    The HR is cropped to `scale` × the LR size when it is larger (HR sizes not divisible by the scale).
    `bicubic_cache` keeps the bicubic scores between calls (they never change).
    """
    from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score
    from dalpsr.image_io import load_image

    protocol = MetricProtocol(color="y", color_space="ycbcr", crop_border=4, round_8bit=True)
    metrics, errors = build_metrics(["psnr", "ssim"], protocol)
    if errors:
        raise RuntimeError(f"validation metrics could not be built: {errors}")
    cache = {} if bicubic_cache is None else bicubic_cache
    images = []
    for name, hr_path, lr_path in pairs:
        lr = load_image(lr_path).rgb
        hr = load_image(hr_path).rgb
        h, w = lr.shape[-2] * scale, lr.shape[-1] * scale
        if hr.shape[-2] < h or hr.shape[-1] < w:
            raise ValueError(f"validation pair {name}: HR {tuple(hr.shape[-2:])} is smaller than LR×{scale} {(h, w)}.")
        hr = hr[:, :h, :w]
        batch = lr[None].to(device)
        sr = net.super_resolve(batch, encoder=encoder, tile_size=tile_size)[0].float().clamp(0, 1).cpu()
        row = {"name": name, **{k: score(m, sr, hr, protocol) for k, m in metrics.items()}}
        if name not in cache:
            bic = F.interpolate(lr[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
            cache[name] = {k: score(m, bic, hr, protocol) for k, m in metrics.items()}
        row["bicubic"] = cache[name]
        images.append(row)
    mean = {k: sum(r[k] for r in images) / len(images) for k in metrics}
    bicubic = {k: sum(r["bicubic"][k] for r in images) / len(images) for k in metrics}
    return {"n": len(images), "protocol": protocol.to_dict(), "mean": mean, "bicubic": bicubic, "images": images}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_args())
