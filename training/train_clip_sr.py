"""Train CLIP-SR (text-guided ×8 / ×16 SR) on HR folders degraded on the fly, with their prompts (Accelerate).

Each HR crop is degraded in the loop (`dalpsr.degradations.degrade`, default preset "balanced" at the model's
scale); the prompt the vocabulary writes for the applied degradation ("Deblur with sigma 0.25~0.50, Denoise with
sigma 0.50~0.75, ...") is embedded by the open_clip text tower of a `DegradationEncoder` (default: the tiny one in
`weights/degradation_tiny`) and steers the network. Text dropout (`--text_dropout`) replaces the prompt by the
empty one, so the model also works without text. Loss: L1(SR, HR) + `--predictor_loss_weight` · cross-entropy of
the prompt predictor against the applied degradation's bins.

Validation (`--validation_data_dir`, the first `--validation_samples` images, or those named by
`--validation_names`; centre crops, each degraded once with a fixed seed): PSNR/SSIM (Y of BT.601, border =
scale) with the true prompt, another image's prompt (wrong text), no text and the predicted prompt, beside
bicubic; and the prompt predictor's per-type bin accuracy.

    accelerate launch training/train_clip_sr.py --model_config train_clip_sr_tiny.json \
        --train_data_dir HR_DIR --validation_data_dir HELD_OUT_HR_DIR --output_dir out/clip_sr

Output: `model/` (a `CLIPSR` folder), `checkpoint-N/`, `validation/step-N.json`, `train_args.json`,
`model_data.json` (crop size, scale, preset, text encoder).
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
from torch.utils.data import DataLoader, Dataset

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

CONFIG_SECTIONS = {"model", "data"}
MODEL_SUBFOLDER = "model"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model_config",
        default="train_clip_sr_tiny.json",
        help="JSON with 'model' (CLIPSR arguments) and 'data' sections: a path, or a file name in configs/",
    )
    p.add_argument("--pretrained_model", default=None, help="start from a CLIPSR folder (overrides 'model')")
    p.add_argument(
        "--text_encoder",
        default=None,
        help="DegradationEncoder folder (or a folder holding degradation_encoder/) whose text tower embeds the "
        "prompts; default: the shipped weights/degradation_tiny",
    )
    p.add_argument("--train_data_dir", nargs="+", required=True, help="folder(s) of HR images")
    p.add_argument("--exclude_names", nargs="*", default=[], help="image stems to leave out of training (held out)")
    p.add_argument("--validation_data_dir", nargs="*", default=[], help="folder(s) of held-out HR images")
    p.add_argument("--validation_names", nargs="*", default=None, help="only these stems of the validation folders")
    p.add_argument("--validation_samples", type=int, default=8, help="at most N validation images (sorted by name)")
    p.add_argument("--validation_size", type=int, default=128, help="HR centre-crop size for validation")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hr_size", type=int, default=None, help="HR crop size (default: config data.hr_size)")
    p.add_argument("--degradation", default=None, help="degradation preset (default: config data.degradation)")
    p.add_argument("--crops_per_image", type=int, default=8, help="random crops per image per epoch")
    p.add_argument("--recursive", action="store_true", help="include sub-folders of the data folders")
    add_optimization_arguments(p, learning_rate=5e-4)
    p.add_argument("--text_dropout", type=float, default=0.2, help="probability of training a crop with no text")
    p.add_argument("--predictor_loss_weight", type=float, default=0.1)
    p.add_argument(
        "--train_predictor_only",
        action="store_true",
        help="optimise only the prompt predictor (e.g. from --pretrained_model); the SR network stays as it is",
    )
    p.add_argument("--max_train_minutes", type=float, default=None, help="stop (and save) after this wall time")
    add_run_arguments(p)
    args = parse_with_config(p, input_args)
    require_positive(args, (*COUNT_ARGUMENTS, "validation_size"))
    if not 0.0 <= args.text_dropout <= 1.0:
        raise ValueError(f"`--text_dropout` must lie in [0, 1]; got {args.text_dropout}.")
    if args.train_predictor_only and args.predictor_loss_weight <= 0:
        raise ValueError("`--train_predictor_only` needs `--predictor_loss_weight` > 0.")
    if args.predictor_loss_weight < 0:
        raise ValueError(f"`--predictor_loss_weight` must be >= 0; got {args.predictor_loss_weight}.")
    return args


def load_model_config(name_or_path: str) -> dict:
    path, cfg = read_model_config(name_or_path)
    unknown = set(cfg) - CONFIG_SECTIONS
    if unknown or "model" not in cfg:
        raise ValueError(f"`--model_config` {path} needs a 'model' section (and optional 'data'); got {sorted(cfg)}.")
    return cfg


def gather_paths(roots, size: int, recursive: bool, exclude=(), only=None) -> list[Path]:
    """Images of `roots` at least `size` px on each side, by name, minus the `exclude` stems (or only `only`)."""
    from dalpsr.image_io import list_images, usable_images

    paths = []
    for root in roots:
        found, skipped = usable_images(list_images([root], recursive=recursive), size)
        for path, reason in skipped:
            logger.warning(f"skipping {path}: {reason}")
        paths += [q for q in found if q.stem not in set(exclude) and (only is None or q.stem in set(only))]
    return paths


class HRCrops(Dataset):
    """Random HR crops of images held in memory (each read once): item `i` is crop `i % crops_per_image` of
    image `i // crops_per_image`, its position and degradation seed derived from (seed, epoch, name, crop)."""

    def __init__(self, paths: list[Path], size: int, crops_per_image: int, seed: int) -> None:
        from dalpsr.image_io import load_image

        if not paths:
            raise ValueError("`paths` is empty: no training image of at least the crop size.")
        self.images = [load_image(q).rgb for q in paths]
        self.names = [f"{q.parent.name}/{q.name}" for q in paths]
        self.size, self.crops_per_image, self.seed, self.epoch = size, crops_per_image, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images) * self.crops_per_image

    def __getitem__(self, index: int) -> dict:
        from dalpsr.runtime import derive_seed, seeded_generator

        i, crop = divmod(index, self.crops_per_image)
        img = self.images[i]
        g = seeded_generator(self.seed, "crop", self.epoch, self.names[i], crop)
        top = int(torch.randint(0, img.shape[-2] - self.size + 1, (1,), generator=g))
        left = int(torch.randint(0, img.shape[-1] - self.size + 1, (1,), generator=g))
        hr = img[:, top : top + self.size, left : left + self.size]
        if int(torch.randint(0, 2, (1,), generator=g)):
            hr = hr.flip(-1)
        seed = derive_seed(self.seed, "degradation", self.epoch, self.names[i], crop)
        return {"hr": hr.contiguous(), "seed": seed}


def validation_set(paths: list[Path], size: int, scale: int, config, seed: int) -> list[dict]:
    """Centre crops, each degraded once with a seed derived from its name."""
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.image_io import load_image
    from dalpsr.runtime import derive_seed

    size -= size % scale
    items = []
    for path in paths:
        rgb = load_image(path).rgb
        h, w = rgb.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        hr = rgb[None, :, top : top + size, left : left + size].contiguous()
        out = degrade(hr, config, scale=scale, seeds=[derive_seed(seed, "validation", path.name)])
        items.append(
            {"name": path.stem, "hr": hr[0], "lr": out.lr[0], "labels": out.labels[0], "prompt": out.prompts[0]}
        )
    return items


@torch.no_grad()
def evaluate(net, encoder, items: list[dict], scale: int, device, text_cache: dict) -> dict:
    """PSNR/SSIM of bicubic and of the model given the true, a wrong, no and the predicted prompt; predictor
    per-type bin accuracy."""
    from dalpsr.degradations import vocabulary
    from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score
    from dalpsr.models.clip_sr import embed_prompts, labels_to_classes, swap_prompts

    protocol = MetricProtocol(color="y", color_space="ycbcr", crop_border=scale, round_8bit=True)
    metrics, errors = build_metrics(["psnr", "ssim"], protocol)
    if errors:
        raise RuntimeError(f"validation metrics could not be built: {errors}")
    lr = torch.stack([it["lr"] for it in items]).to(device)
    true = [it["prompt"] for it in items]
    pred = net.prompt_predictor.predict(lr) if net.prompt_predictor is not None else None
    prompts = {"true_text": true, "wrong_text": swap_prompts(true)}
    if pred is not None:
        prompts["predicted_text"] = pred.prompts
    outputs = {name: net.super_resolve(lr, embed_prompts(encoder, p, text_cache)) for name, p in prompts.items()}
    outputs["no_text"] = net.super_resolve(lr)
    outputs["bicubic"] = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
    summary = {}
    for name, sr in outputs.items():
        for k, m in metrics.items():
            vals = [score(m, sr[i].cpu(), it["hr"], protocol) for i, it in enumerate(items)]
            summary[f"{name}/{k}"] = sum(vals) / len(vals)
    summary["gap_psnr"] = summary["true_text/psnr"] - summary["wrong_text/psnr"]
    if pred is not None:
        truth = labels_to_classes(torch.stack([it["labels"] for it in items]))
        got = pred.logits.argmax(-1).cpu()
        for t, name in enumerate(vocabulary.TYPE_NAMES):
            summary[f"predictor_acc/{name}"] = float((got[:, t] == truth[:, t]).float().mean())
    return {"n": len(items), "protocol": protocol.to_dict(), "mean": summary}


def main(args: argparse.Namespace) -> Path:
    import time

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from dalpsr.degradations.config import preset
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.image_io import atomic_write_bytes
    from dalpsr.loaders.degradation import load_degradation_encoder, load_degradation_models
    from dalpsr.models.clip_sr import CLIPSR, embed_prompts, prediction_loss
    from dalpsr.runtime import seeded_generator

    deadline = None if args.max_train_minutes is None else time.monotonic() + 60 * args.max_train_minutes
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
    model = CLIPSR.from_pretrained(args.pretrained_model) if args.pretrained_model else CLIPSR(**cfg["model"])
    scale = data_cfg.get("scale", model.config.scale)
    if model.config.scale != scale:
        raise ValueError(f"The model upscales ×{model.config.scale} but the data scale is ×{scale}; make them agree.")
    hr_size = args.hr_size or data_cfg.get("hr_size", 96)
    if hr_size % scale:
        raise ValueError(f"`--hr_size` must be a multiple of the scale {scale}; got {hr_size}.")
    degradation = args.degradation or data_cfg.get("degradation", "balanced")
    config = preset(degradation, scale=scale)

    if args.text_encoder:
        encoder = load_degradation_encoder(args.text_encoder)
    else:
        encoder = load_degradation_models()[0]
    encoder = encoder.to(accelerator.device).eval().requires_grad_(False)
    if encoder.clip.text_projection is not None and encoder.clip.text_projection.shape[-1] != model.config.text_dim:
        raise ValueError(
            f"The text tower embeds in {encoder.clip.text_projection.shape[-1]} dimensions but the model's "
            f"`text_dim` is {model.config.text_dim}."
        )
    text_cache: dict[str, torch.Tensor] = {}
    if not args.pretrained_model:
        model.set_null_text(embed_prompts(encoder, [""], text_cache)[0])
    logger.info(f"CLIPSR ×{scale}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters; {degradation}")

    paths = gather_paths(args.train_data_dir, hr_size, args.recursive, exclude=args.exclude_names)
    dataset = HRCrops(paths, hr_size, args.crops_per_image, args.seed)
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochPermutation(len(dataset), args.seed),
        drop_last=len(dataset) >= args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    val_items = []
    if args.validation_data_dir:
        val_paths = gather_paths(
            args.validation_data_dir, args.validation_size, args.recursive, only=args.validation_names
        )[: args.validation_samples]
        if not val_paths:
            raise ValueError(f"`--validation_data_dir` {args.validation_data_dir} has no usable image.")
        val_items = validation_set(val_paths, args.validation_size, scale, config, args.seed)

    if args.train_predictor_only:
        if model.prompt_predictor is None:
            raise ValueError("`--train_predictor_only` needs a model with a prompt predictor (predictor_channels > 0).")
        model.requires_grad_(False)
        model.prompt_predictor.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
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

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("clip_sr", config={k: str(v) for k, v in vars(args).items()})
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / "train_args.json", (json.dumps(vars(args), indent=2) + "\n").encode())

    global_step = resume_state(accelerator, output_dir, args.resume_from_checkpoint)
    first_epoch = global_step // steps_per_epoch
    resume_step = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    def validate(step: int) -> None:
        if not val_items or not accelerator.is_main_process:
            return
        net.eval()
        try:
            metrics = evaluate(net, encoder, val_items, scale, accelerator.device, text_cache)
        finally:
            net.train()
        log_validation(accelerator, output_dir, step, metrics, metrics["mean"])

    model.train()
    micro_step = global_step * args.gradient_accumulation_steps
    done = global_step >= args.max_train_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        dataset.set_epoch(epoch)
        epoch_loader = loader
        if epoch == first_epoch and resume_step:
            from accelerate import skip_first_batches

            epoch_loader = skip_first_batches(loader, resume_step)
        epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            g = seeded_generator(args.seed, "text_dropout", micro_step, accelerator.process_index)
            micro_step += 1
            with accelerator.accumulate(model):
                hr = batch["hr"].float()
                seeds = [int(s) for s in batch["seed"]]
                out = degrade(hr.cpu(), config, scale=scale, seeds=seeds)
                lr = out.lr.to(hr.device)
                prompts = ["" if float(torch.rand((), generator=g)) < args.text_dropout else p for p in out.prompts]
                text = embed_prompts(encoder, prompts, text_cache).to(hr.device)
                if args.train_predictor_only:  # the SR network is frozen: no forward through it
                    loss_l1 = loss = torch.zeros((), device=hr.device)
                else:
                    loss_l1 = F.l1_loss(model(lr, text).sample.float(), hr)
                    loss = loss_l1
                loss_pred = torch.zeros(())
                if net.prompt_predictor is not None and args.predictor_loss_weight > 0:
                    loss_pred = prediction_loss(net.prompt_predictor(lr), out.labels)
                    loss = loss + args.predictor_loss_weight * loss_pred
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {
                "loss": loss.item(),
                "loss_l1": loss_l1.item(),
                "loss_predictor": loss_pred.item(),
                "lr": lr_scheduler.get_last_lr()[0],
            }
            accelerator.log(logs, step=global_step)
            if global_step % args.logging_steps == 0:
                logger.info(f"step {global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            out_of_time = deadline is not None and time.monotonic() > deadline
            if global_step % args.checkpointing_steps == 0 or out_of_time:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step % args.validation_steps == 0:
                validate(global_step)
            if global_step >= args.max_train_steps or out_of_time:
                if out_of_time:
                    logger.info(f"--max_train_minutes {args.max_train_minutes} reached at step {global_step}")
                done = True
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if global_step % args.validation_steps:
            validate(global_step)
        net.save_pretrained(output_dir / MODEL_SUBFOLDER)
        data = {
            "hr_size": hr_size,
            "scale": scale,
            "degradation": degradation,
            "steps": global_step,
            "text_encoder": args.text_encoder or "weights/degradation_tiny/degradation_encoder (shipped)",
            "train_images": len(paths),
        }
        atomic_write_bytes(output_dir / "model_data.json", (json.dumps(data, indent=2) + "\n").encode())
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_args())
