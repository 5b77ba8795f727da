"""Train PL-IDENet (blind SR with implicit kernel estimation) on HR folders degraded on the fly (Accelerate).

HR crops are degraded in the loop with the blind-SR presets ("setting1": isotropic Gaussian blur + bicubic,
"setting2": anisotropic blur + bicubic + noise; several presets are mixed per crop). Loss, as in the paper:
L1(SR, HR) + `--kernel_loss_weight` · L1(bicubic↓(HR ⊛ k̂), LR), the implicit kernel loss that trains the
estimator without ground-truth kernels. `--estimator_steps N` first trains the estimator alone for N steps (the
kernel loss only, its own optimizer and schedule, on `--estimator_hr_size` crops: the estimator needs more LR
pixels than the SR body can afford, and a step without the SR body is many times cheaper); the joint stage
follows, with the estimator trained on or held fixed (`--freeze_estimator`). Validation: the first
`--validation_samples` images of an HR folder, centre-cropped, degraded once per preset with fixed seeds;
PSNR/SSIM on the Y channel (BT.601), border = scale, beside bicubic; and the kernel error against the kernel
actually applied (σ error, kernel L1, the correlation of σ̂ with σ), beside the bicubic-only (delta kernel) baseline.

    accelerate launch training/train_pl_idenet.py --model_config train_pl_idenet_tiny.json \
        --train_data_dir HR_DIR --validation_data_dir HELD_OUT_HR_DIR --output_dir out/pl_idenet

Output: `model/` (a `PLIDENet` folder), `checkpoint-N/`, `validation/step-N.json`, `train_args.json`,
`model_data.json` (crop size, scale, presets).
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

from dalpsr.evaluation.degradation import pearson
from dalpsr.training_utils import (
    COUNT_ARGUMENTS,
    EpochPermutation,
    add_optimization_arguments,
    add_run_arguments,
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
        default="train_pl_idenet_tiny.json",
        help="JSON with 'model' (PLIDENet arguments) and 'data' sections: a path, or a file name in dalpsr.configs",
    )
    p.add_argument("--pretrained_model", default=None, help="start from a PLIDENet folder (overrides 'model')")
    p.add_argument(
        "--init_restorer_from",
        default=None,
        help="PLIDENet folder whose weights, all but the estimator's, start the model (same restorer config)",
    )
    p.add_argument("--train_data_dir", nargs="+", required=True, help="folder(s) of HR images")
    p.add_argument("--validation_data_dir", default=None, help="folder of held-out HR images")
    p.add_argument("--validation_samples", type=int, default=8, help="first N images (sorted by name)")
    p.add_argument("--validation_size", type=int, default=128, help="HR centre-crop size for validation")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hr_size", type=int, default=None, help="HR crop size (default: config data.hr_size)")
    p.add_argument("--scale", type=int, default=None, help="SR scale (default: config data.scale)")
    p.add_argument("--degradation", nargs="+", default=None, help="preset(s), mixed per crop (default: config)")
    p.add_argument("--crops_per_image", type=int, default=8, help="random crops per image per epoch")
    p.add_argument("--recursive", action="store_true", help="include sub-folders of the data folders")
    add_optimization_arguments(p)
    p.add_argument("--l1_weight", type=float, default=1.0)
    p.add_argument("--kernel_loss_weight", type=float, default=1.0, help="weight of the implicit kernel loss")
    p.add_argument(
        "--estimator_steps",
        type=int,
        default=0,
        help="first N of --max_train_steps: the estimator alone, on the implicit kernel loss only (0: none)",
    )
    p.add_argument(
        "--estimator_hr_size", type=int, default=None, help="HR crop size of the estimator stage (default: --hr_size)"
    )
    p.add_argument(
        "--estimator_learning_rate",
        type=float,
        default=None,
        help="peak learning rate of the estimator stage (default: --learning_rate)",
    )
    p.add_argument(
        "--freeze_estimator",
        action="store_true",
        help="hold the estimator fixed in the joint stage (eval mode, no gradient; the kernel loss is only logged)",
    )
    p.add_argument("--max_train_minutes", type=float, default=None, help="stop (and save) after this wall time")
    add_run_arguments(p)
    args = parse_with_config(p, input_args)
    require_positive(args, (*COUNT_ARGUMENTS, "validation_size"))
    if not 0 <= args.estimator_steps <= args.max_train_steps:
        raise ValueError(
            f"`--estimator_steps` must be in [0, `--max_train_steps` ({args.max_train_steps})]; "
            f"got {args.estimator_steps}."
        )
    for name in ("estimator_hr_size", "estimator_learning_rate"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"`--{name}` must be > 0; got {value}.")
    if args.l1_weight < 0 or args.kernel_loss_weight < 0:
        raise ValueError(
            f"`--l1_weight`/`--kernel_loss_weight` must be >= 0; got {args.l1_weight}, {args.kernel_loss_weight}."
        )
    return args


def load_model_config(name_or_path: str) -> dict:
    """A run config from a path, or by file name from the configs shipped as `dalpsr.configs`."""
    path, cfg = read_model_config(name_or_path)
    unknown = set(cfg) - CONFIG_SECTIONS
    if unknown or "model" not in cfg:
        raise ValueError(f"`--model_config` {path} needs a 'model' section (and optional 'data'); got {sorted(cfg)}.")
    return cfg


def applied_kernel(params, size: int) -> torch.Tensor:
    """The size×size stage-1 blur kernel a `DegradationParams` records (a delta when no blur was applied)."""
    from dalpsr.degradations.kernels import gaussian_family_kernel, pad_kernel

    blur = params.stage1.blur
    if blur is None:
        k = torch.zeros(size, size, dtype=torch.float64)
        k[size // 2, size // 2] = 1.0
        return k.float()
    if blur.kind == "sinc" or blur.size > size:
        raise ValueError(f"the stage-1 kernel ({blur.kind}, {blur.size} px) is not a Gaussian of at most {size} px.")
    kernel = gaussian_family_kernel(blur.kind, blur.size, blur.sigma_x, blur.sigma_y, blur.rotation, blur.beta)
    return pad_kernel(kernel, size).float()


def degrade_mixed(hr: torch.Tensor, configs: list, scale: int, seeds: list[int]):
    """LR batch and per-image `DegradationParams`, each crop degraded by the preset its seed picks."""
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.runtime import derive_seed

    choice = [derive_seed(s, "preset") % len(configs) for s in seeds]
    lr = hr.new_empty(hr.shape[0], 3, hr.shape[-2] // scale, hr.shape[-1] // scale)
    params = [None] * hr.shape[0]
    for j, config in enumerate(configs):
        idx = [i for i, c in enumerate(choice) if c == j]
        if not idx:
            continue
        out = degrade(hr[idx], config, scale=scale, seeds=[seeds[i] for i in idx])
        lr[idx] = out.lr
        for i, p in zip(idx, out.params):
            params[i] = p
    return lr, params


def validation_set(root: str, n: int, size: int, scale: int, presets: list[str], seed: int) -> list[dict]:
    """Centre crops of the first `n` images of `root`, each degraded once per preset with a fixed seed."""
    from dalpsr.degradations.config import preset
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.image_io import list_images, load_image
    from dalpsr.runtime import derive_seed

    size -= size % scale
    items = []
    for path in list_images([Path(root)])[:n]:
        rgb = load_image(path).rgb
        h, w = rgb.shape[-2:]
        if min(h, w) < size:
            logger.warning(f"validation: skipping {path.name} ({h}×{w} < {size})")
            continue
        top, left = (h - size) // 2, (w - size) // 2
        hr = rgb[None, :, top : top + size, left : left + size].contiguous()
        for name in presets:
            s = derive_seed(seed, "validation", path.name, name)
            out = degrade(hr, preset(name, scale=scale), scale=scale, seeds=[s])
            items.append({"name": f"{path.stem}/{name}", "hr": hr[0], "lr": out.lr[0], "params": out.params[0]})
    if not items:
        raise ValueError(f"`--validation_data_dir` {root} has no image of at least {size} pixels.")
    return items


@torch.no_grad()
def evaluate(net, items: list[dict], scale: int, device, bicubic_cache: dict | None = None) -> dict:
    """PSNR/SSIM (Y of BT.601 YCbCr, border = scale, 8-bit) of the model and bicubic; kernel σ error and L1."""
    from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score
    from dalpsr.models.pl_idenet import kernel_sigma

    protocol = MetricProtocol(color="y", color_space="ycbcr", crop_border=scale, round_8bit=True)
    metrics, errors = build_metrics(["psnr", "ssim"], protocol)
    if errors:
        raise RuntimeError(f"validation metrics could not be built: {errors}")
    cache = {} if bicubic_cache is None else bicubic_cache
    size = net.config.kernel_size
    delta = torch.zeros(1, size, size)
    delta[0, size // 2, size // 2] = 1.0
    rows = []
    for item in items:
        hr, lr = item["hr"], item["lr"]
        out = net(lr[None].to(device))
        sr = out.sample[0].float().clamp(0, 1).cpu()
        true = applied_kernel(item["params"], size)[None]
        est = out.kernel.float().cpu()
        row = {
            "name": item["name"],
            **{k: score(m, sr, hr, protocol) for k, m in metrics.items()},
            "sigma_true": float(kernel_sigma(true)[0]),
            "sigma_est": float(kernel_sigma(est)[0]),
            "kernel_l1": float((est - true).abs().sum()),
            "kernel_l1_delta": float((delta - true).abs().sum()),
        }
        if item["name"] not in cache:
            bic = F.interpolate(lr[None], size=hr.shape[-2:], mode="bicubic", align_corners=False)[0].clamp(0, 1)
            cache[item["name"]] = {k: score(m, bic, hr, protocol) for k, m in metrics.items()}
        row["bicubic"] = cache[item["name"]]
        rows.append(row)

    def mean(values):
        return sum(values) / len(values)

    summary = {k: mean([r[k] for r in rows]) for k in metrics}
    summary["sigma_error"] = mean([abs(r["sigma_est"] - r["sigma_true"]) for r in rows])
    summary["kernel_l1"] = mean([r["kernel_l1"] for r in rows])
    baseline = {k: mean([r["bicubic"][k] for r in rows]) for k in metrics}
    baseline["sigma_error"] = mean([r["sigma_true"] for r in rows])  # the delta kernel has σ = 0
    baseline["kernel_l1"] = mean([r["kernel_l1_delta"] for r in rows])
    return {
        "n": len(rows),
        "protocol": protocol.to_dict(),
        "mean": summary,
        "bicubic": baseline,
        "sigma_corr": pearson([r["sigma_est"] for r in rows], [r["sigma_true"] for r in rows]),
        "images": rows,
    }


def main(args: argparse.Namespace) -> Path:
    import time

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from dalpsr.data.pairs import HRFolderPairs
    from dalpsr.degradations.config import preset
    from dalpsr.image_io import atomic_write_bytes, list_images, usable_images
    from dalpsr.models.pl_idenet import PLIDENet, kernel_loss
    from dalpsr.runtime import derive_seed

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
    hr_size = args.hr_size or data_cfg.get("hr_size", 64)
    scale = args.scale or data_cfg.get("scale", 4)
    presets = args.degradation or data_cfg.get("degradation", ["setting1"])
    presets = [presets] if isinstance(presets, str) else list(presets)
    configs = [preset(name, scale=scale) for name in presets]

    if args.pretrained_model:
        model = PLIDENet.from_pretrained(args.pretrained_model)
    else:
        model = PLIDENet(**cfg["model"])
    if args.init_restorer_from:
        source = PLIDENet.from_pretrained(args.init_restorer_from).state_dict()
        restorer = {k: v for k, v in source.items() if not k.startswith("estimator.")}
        try:
            missing, unexpected = model.load_state_dict(restorer, strict=False)
        except RuntimeError as err:
            raise ValueError(f"`--init_restorer_from` {args.init_restorer_from}: the restorer differs: {err}") from None
        missing = [k for k in missing if not k.startswith("estimator.")]
        if missing or unexpected:
            raise ValueError(
                f"`--init_restorer_from` {args.init_restorer_from}: the restorer differs (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})."
            )
        logger.info(f"restorer weights from {args.init_restorer_from} ({len(restorer)} tensors)")
    if model.config.scale != scale:
        raise ValueError(f"The model upscales ×{model.config.scale} but the data scale is ×{scale}; make them agree.")
    logger.info(f"PLIDENet ×{scale}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters; {presets}")

    def hr_loader(size: int):
        parts = []
        for root in args.train_data_dir:
            paths, skipped = usable_images(list_images([root], recursive=args.recursive), size)
            for path, reason in skipped:
                logger.warning(f"skipping {path}: {reason}")
            if paths:
                parts.append(
                    HRFolderPairs(
                        root, size=size, scale=scale, config=configs[0], crops_per_image=args.crops_per_image,
                        seed=args.seed, degrade=False, paths=paths,
                    )
                )  # fmt: skip
        if not parts:
            raise ValueError(f"`--train_data_dir` {args.train_data_dir} has no image of at least {size} pixels.")
        dataset = ConcatDataset(parts)
        loader = DataLoader(
            dataset,
            batch_size=args.train_batch_size,
            sampler=EpochPermutation(len(dataset), args.seed),
            drop_last=len(dataset) >= args.train_batch_size,
            num_workers=args.dataloader_num_workers,
        )
        return parts, loader

    estimator_steps = args.estimator_steps
    estimator_hr_size = args.estimator_hr_size or hr_size
    parts, loader = hr_loader(hr_size)
    val_items = []
    if args.validation_data_dir:
        val_items = validation_set(
            args.validation_data_dir, args.validation_samples, args.validation_size, scale, presets, args.seed
        )

    def adamw(params, lr: float):
        return torch.optim.AdamW(
            params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )  # fmt: skip

    def schedule(optimizer, steps: int):
        return get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=min(args.lr_warmup_steps, steps) * accelerator.num_processes,
            num_training_steps=steps * accelerator.num_processes,
        )

    joint_params = [
        p for n, p in model.named_parameters() if not (args.freeze_estimator and n.startswith("estimator."))
    ]
    optimizer = adamw(joint_params, args.learning_rate)
    lr_scheduler = schedule(optimizer, args.max_train_steps - estimator_steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    net = accelerator.unwrap_model(model)
    # (name, parts, loader, optimizer, scheduler, first global step, end global step)
    stages = [("joint", parts, loader, optimizer, lr_scheduler, estimator_steps, args.max_train_steps)]
    if estimator_steps:
        est_parts, est_loader = hr_loader(estimator_hr_size)
        est_optimizer = adamw(net.estimator.parameters(), args.estimator_learning_rate or args.learning_rate)
        est_scheduler = schedule(est_optimizer, estimator_steps)
        est_optimizer, est_loader, est_scheduler = accelerator.prepare(est_optimizer, est_loader, est_scheduler)
        stages.insert(0, ("estimator", est_parts, est_loader, est_optimizer, est_scheduler, 0, estimator_steps))

    if accelerator.is_main_process:
        accelerator.init_trackers("pl_idenet", config={k: str(v) for k, v in vars(args).items()})
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / "train_args.json", (json.dumps(vars(args), indent=2) + "\n").encode())

    global_step = resume_state(accelerator, output_dir, args.resume_from_checkpoint)
    bicubic_scores: dict[str, dict[str, float]] = {}

    def train_mode(stage: str) -> None:
        net.train()
        frozen = stage == "joint" and args.freeze_estimator
        net.estimator.requires_grad_(not frozen)
        if frozen:
            net.estimator.eval()

    def validate(step: int, stage: str) -> None:
        if not val_items or not accelerator.is_main_process:
            return
        net.eval()
        try:
            metrics = evaluate(net, val_items, scale, accelerator.device, bicubic_scores)
        finally:
            train_mode(stage)
        metrics["step"], metrics["stage"] = step, stage
        atomic_write_bytes(
            output_dir / "validation" / f"step-{step}.json", (json.dumps(metrics, indent=2) + "\n").encode()
        )
        corr = metrics["sigma_corr"]
        accelerator.log({f"val/{k}": v for k, v in metrics["mean"].items()}, step=step)
        logger.info(
            f"validation step {step} ({stage}) on {metrics['n']} images: "
            + ", ".join(f"{k}={v:.4f} (baseline {metrics['bicubic'][k]:.4f})" for k, v in metrics["mean"].items())
            + ", corr(sigma_est, sigma)="
            + ("n/a" if corr is None else f"{corr:.3f}")
        )

    stage = stages[0][0]
    done = global_step >= args.max_train_steps
    for stage, stage_parts, stage_loader, stage_optimizer, stage_scheduler, first, end in stages:
        if done:
            break
        if global_step >= end:
            continue
        train_mode(stage)
        steps_per_epoch = math.ceil(len(stage_loader) / args.gradient_accumulation_steps)
        first_epoch = (global_step - first) // steps_per_epoch
        resume_step = ((global_step - first) % steps_per_epoch) * args.gradient_accumulation_steps
        num_epochs = math.ceil((end - first) / steps_per_epoch)
        micro_step = global_step * args.gradient_accumulation_steps
        for epoch in range(first_epoch, num_epochs):
            if done:
                break
            for part in stage_parts:
                part.set_epoch(epoch)
            epoch_loader = stage_loader
            if epoch == first_epoch and resume_step:
                from accelerate import skip_first_batches

                epoch_loader = skip_first_batches(stage_loader, resume_step)
            epoch_loader.set_epoch(epoch)
            for batch in epoch_loader:
                # stochastic depth draws from the global RNG: seed it per step so a resumed run repeats the same draws
                torch.manual_seed(derive_seed(args.seed, "drop_path", micro_step, accelerator.process_index))
                micro_step += 1
                with accelerator.accumulate(model):
                    seeds = [derive_seed(int(s), "degradation", 0) for s in batch["seed"]]
                    hr = batch["hr"].float()
                    lr, _ = degrade_mixed(hr.cpu(), configs, scale, seeds)
                    lr = lr.to(hr.device)
                    logs = {}
                    if stage == "estimator":
                        out = model(lr, kernel_only=True)
                        loss = loss_kernel = kernel_loss(hr, out.kernel.float(), lr)
                    else:
                        out = model(lr)
                        loss_l1 = F.l1_loss(out.sample.float(), hr)
                        loss_kernel = kernel_loss(hr, out.kernel.float(), lr)
                        weight = 0.0 if args.freeze_estimator else args.kernel_loss_weight
                        loss = args.l1_weight * loss_l1 + weight * loss_kernel
                        logs["loss_l1"] = loss_l1.item()
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    stage_optimizer.step()
                    stage_scheduler.step()
                    stage_optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                logs.update(loss=loss.item(), loss_kernel=loss_kernel.item(), lr=stage_scheduler.get_last_lr()[0])
                accelerator.log(logs, step=global_step)
                if global_step % args.logging_steps == 0:
                    logger.info(f"step {global_step} ({stage}): " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                out_of_time = deadline is not None and time.monotonic() > deadline
                if global_step % args.checkpointing_steps == 0 or out_of_time:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                if global_step % args.validation_steps == 0:
                    validate(global_step, stage)
                if out_of_time:
                    logger.info(f"--max_train_minutes {args.max_train_minutes} reached at step {global_step}")
                    done = True
                if global_step >= end or out_of_time:
                    break
            if global_step >= end:
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if global_step % args.validation_steps:
            validate(global_step, stage)
        net.save_pretrained(output_dir / MODEL_SUBFOLDER)
        data = {
            "hr_size": hr_size, "scale": scale, "degradation": presets, "steps": global_step,
            "estimator_steps": estimator_steps, "estimator_hr_size": estimator_hr_size,
        }  # fmt: skip
        atomic_write_bytes(output_dir / "model_data.json", (json.dumps(data, indent=2) + "\n").encode())
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_args())
