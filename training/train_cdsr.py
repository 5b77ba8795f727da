"""Train CDSR-style models on HR folders degraded on the fly (Accelerate): LPE pre-training, then an SR network.

`--stage lpe` pre-trains CDSR's lightweight patch encoder (`dalpsr.models.cdsr.LightweightPatchEncoder`) by
InfoNCE against a queue of momentum-encoder keys (MoCo, as CDSR and DASR): query and key are two crops of one HR
image degraded with the same parameters, the queue holds other images' keys. Output: `lpe/`.

`--stage sr` trains an SR network with a frozen feature encoder: `--arch dat` (a `DATRestorer`, `--fusion none |
srclip | dqa`, `--feature_source clip | lpe`, typically from `--pretrained_dat`) or `--arch cdsr` (CDSR's own
`CDSRNet`, fed by an LPE). Loss L1; an EMA of the weights is kept and saved. Output: `restorer/` and the encoder
it reads (`degradation_encoder/` or `lpe/`).

Every run draws the same crops and degradations for the same `--seed`, data and `--degradations`: item i's crop
and degradation follow from one seed of (seed, epoch, image, crop index), and its preset is
`degradations[seed % len(degradations)]`, so arms trained with the same arguments see identical LR/HR batches.

    python training/train_cdsr.py --stage lpe --train_data_dir HR_DIR --output_dir out/lpe
    python training/train_cdsr.py --stage sr --arch dat --fusion dqa --feature_source lpe --encoder out/lpe \
        --pretrained_dat weights/dat_light_x4 --train_data_dir HR_DIR --output_dir out/dqa_lpe
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
    EpochPermutation,
    add_run_arguments,
    parse_with_config,
    require_positive,
    resume_state,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

STAGES = ("lpe", "sr")
ARCHS = ("dat", "cdsr")
FUSIONS = ("none", "srclip", "dqa")
FEATURE_SOURCES = ("clip", "lpe")
RESTORER_SUBFOLDER = "restorer"
CLIP_SUBFOLDER = "degradation_encoder"
LPE_SUBFOLDER = "lpe"
COUNTS = (
    "max_train_steps",
    "train_batch_size",
    "checkpointing_steps",
    "crops_per_image",
    "logging_steps",
    "hr_size",
    "scale",
    "queue_size",
)


def _json_arg(text: str) -> dict:
    """A JSON object given inline or as a file path."""
    path = Path(text)
    value = json.loads(path.read_text() if path.is_file() else text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object (inline or a file); got {text!r}.")
    return value


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--train_data_dir", nargs="+", required=True, help="folder(s) of HR images")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hr_size", type=int, default=256, help="HR crop size")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--degradations", nargs="+", default=["setting2", "realesrgan"], help="presets, mixed per item")
    p.add_argument("--crops_per_image", type=int, default=8)
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--fusion_learning_rate", type=float, default=None, help="lr of new fusion parameters")
    p.add_argument("--lr_scheduler", default="cosine")
    p.add_argument("--lr_warmup_steps", type=int, default=20)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.99)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--ema_decay", type=float, default=0.99, help="sr stage; 0 disables the EMA")
    # stage lpe
    p.add_argument("--lpe_config", type=_json_arg, default={}, help="LightweightPatchEncoder arguments (JSON)")
    p.add_argument("--queue_size", type=int, default=4096)
    p.add_argument("--momentum", type=float, default=0.999)
    p.add_argument("--temperature", type=float, default=0.07)
    # stage sr
    p.add_argument("--arch", default="dat", choices=ARCHS)
    p.add_argument("--pretrained_dat", default=None, help="DAT or DATRestorer folder to start the DAT from")
    p.add_argument("--dat_config", type=_json_arg, default=None, help="DAT arguments when not --pretrained_dat")
    p.add_argument("--fusion", default="none", choices=FUSIONS)
    p.add_argument("--feature_source", default="clip", choices=FEATURE_SOURCES)
    p.add_argument("--fusion_config", type=_json_arg, default={}, help="extra DATRestorer arguments (JSON)")
    p.add_argument("--cdsr_config", type=_json_arg, default={}, help="CDSRNet arguments (JSON)")
    p.add_argument("--encoder", default=None, help="frozen DegradationEncoder or LPE folder (or a run holding one)")
    add_run_arguments(p)
    args = parse_with_config(p, input_args)
    require_positive(args, COUNTS)
    if args.hr_size % args.scale:
        raise ValueError(f"`--hr_size` {args.hr_size} must be a multiple of `--scale` {args.scale}.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1); got {args.ema_decay}.")
    if args.stage == "sr":
        needs_encoder = args.arch == "cdsr" or args.fusion != "none"
        if needs_encoder and not args.encoder:
            raise ValueError("`--encoder` is required for `--arch cdsr` and for `--fusion srclip|dqa`.")
        if not needs_encoder and args.encoder:
            raise ValueError("`--encoder` is given but `--fusion none` uses no features.")
        if args.arch == "cdsr" and args.feature_source != "lpe":
            raise ValueError("`--arch cdsr` reads an LPE: pass `--feature_source lpe`.")
        if args.fusion == "srclip" and args.feature_source != "clip":
            raise ValueError("`--fusion srclip` reads the CLIP encoder: pass `--feature_source clip`.")
    return args


class HRCrops(Dataset):
    """Random HR crops of an image folder (decoded once, kept in memory), one or two per item.

    Item i is crop `i % crops_per_image` of image `i // crops_per_image`; its position (and the second crop's,
    with `two_crops`) and its degradation come from `derive_seed(seed * 1_000_003 + epoch, image, crop index)`.
    """

    def __init__(self, paths: list[Path], root: Path, size: int, crops_per_image: int, seed: int, two_crops: bool):
        from dalpsr.image_io import load_image

        self.images = [load_image(p).rgb for p in paths]
        self.sources = [p.relative_to(root).as_posix() for p in paths]
        self.size, self.crops_per_image, self.seed, self.two_crops = size, crops_per_image, seed, two_crops
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images) * self.crops_per_image

    def _crop(self, rgb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        from dalpsr.degradations.kernels import randint

        _, h, w = rgb.shape
        top, left = randint(g, 0, h - self.size), randint(g, 0, w - self.size)
        return rgb[:, top : top + self.size, left : left + self.size].contiguous()

    def __getitem__(self, index: int) -> dict:
        from dalpsr.runtime import derive_seed

        image = index // self.crops_per_image
        seed = derive_seed(self.seed * 1_000_003 + self.epoch, self.sources[image], index % self.crops_per_image)
        g = torch.Generator().manual_seed(seed)
        item = {"hr": self._crop(self.images[image], g), "seed": seed}
        if self.two_crops:
            item["hr_key"] = self._crop(self.images[image], g)
        return item


def build_dataset(args: argparse.Namespace, two_crops: bool) -> list[HRCrops]:
    from dalpsr.image_io import list_images, load_image

    parts = []
    for root in args.train_data_dir:
        root = Path(root)
        paths = []
        for path in list_images([root]):
            _, h, w = load_image(path).rgb.shape
            if min(h, w) < args.hr_size:
                logger.warning(f"skipping {path}: {h}×{w} is smaller than the crop {args.hr_size}")
                continue
            paths.append(path)
        if paths:
            parts.append(HRCrops(paths, root, args.hr_size, args.crops_per_image, args.seed, two_crops))
    if not parts:
        raise ValueError(f"`--train_data_dir` {args.train_data_dir} has no image of at least {args.hr_size} pixels.")
    return parts


def degrade_mixed(hr: torch.Tensor, seeds: list[int], configs: list, scale: int) -> torch.Tensor:
    """LR of each HR crop under preset `configs[seed % len(configs)]`, seeded by its crop seed."""
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.runtime import derive_seed

    lr = torch.empty(hr.shape[0], 3, hr.shape[2] // scale, hr.shape[3] // scale)
    for k, config in enumerate(configs):
        idx = [i for i, s in enumerate(seeds) if s % len(configs) == k]
        if idx:
            degradation_seeds = [derive_seed(seeds[i], "degradation") for i in idx]
            lr[idx] = degrade(hr[idx], config, scale=scale, seeds=degradation_seeds).lr
    return lr


def load_encoder(path: str, source: str):
    """The frozen feature encoder: a `DegradationEncoder` ("clip") or a `LightweightPatchEncoder` ("lpe")."""
    from dalpsr.models.cdsr import LightweightPatchEncoder
    from dalpsr.models.degradation_encoder import DegradationEncoder

    cls, sub = (DegradationEncoder, CLIP_SUBFOLDER) if source == "clip" else (LightweightPatchEncoder, LPE_SUBFOLDER)
    folder = Path(path)
    if (folder / sub / "config.json").is_file():
        folder = folder / sub
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"`--encoder` {path} holds no {cls.__name__} (no config.json, nor {sub}/config.json).")
    return cls.from_pretrained(folder).requires_grad_(False).eval()


def build_sr_model(args: argparse.Namespace, encoder):
    """(model, names of the new parameters that take `--fusion_learning_rate`)."""
    if args.arch == "cdsr":
        from dalpsr.models.cdsr import CDSRNet

        model = CDSRNet(scale=args.scale, embed_dim=encoder.embed_dim, **args.cdsr_config)
        return model, set()
    from dalpsr.models.dat import DAT
    from dalpsr.models.fusion import DATRestorer

    kwargs = dict(args.fusion_config)
    if args.fusion == "none":
        kwargs.update(fusion=None, fusion_layers=[])
    else:
        kwargs.update(fusion=args.fusion, feature_source=args.feature_source)
    context_dim = encoder.embed_dim if encoder is not None else 512
    if args.pretrained_dat:
        folder = Path(args.pretrained_dat)
        if (folder / RESTORER_SUBFOLDER / "config.json").is_file():
            folder = folder / RESTORER_SUBFOLDER
        cls_name = json.loads((folder / "config.json").read_text()).get("_class_name")
        dat = DATRestorer.from_pretrained(folder).dat if cls_name == "DATRestorer" else DAT.from_pretrained(folder)
        model = DATRestorer.from_dat(dat, context_dim=context_dim, **kwargs)
    elif args.dat_config is not None:
        model = DATRestorer(dat_config=args.dat_config, context_dim=context_dim, **kwargs)
    else:
        raise ValueError("`--arch dat` needs `--pretrained_dat` or `--dat_config`.")
    new = {n for n, _ in model.named_parameters() if not n.startswith("dat.")}
    return model, new


def main(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from dalpsr.degradations.config import preset
    from dalpsr.image_io import atomic_write_bytes
    from dalpsr.models.cdsr import LightweightPatchEncoder, MomentumContrast

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    configs = [preset(name, scale=args.scale) for name in args.degradations]

    contrast = encoder = ema = None
    new_params: set[str] = set()
    if args.stage == "lpe":
        model = LightweightPatchEncoder(**args.lpe_config)
        contrast = MomentumContrast(
            model, args.queue_size, args.momentum, args.temperature, torch.Generator().manual_seed(args.seed)
        )
    else:
        encoder = load_encoder(args.encoder, args.feature_source) if args.encoder else None
        model, new_params = build_sr_model(args, encoder)
    fusion_lr = args.fusion_learning_rate or args.learning_rate
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in new_params], "lr": args.learning_rate},
        {"params": [p for n, p in model.named_parameters() if n in new_params], "lr": fusion_lr},
    ]
    groups = [g for g in groups if g["params"]]
    logger.info(
        f"stage {args.stage}: {type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M "
        f"parameters ({sum(p.numel() for g in groups for p in g['params']) / 1e6:.3f} M trained, "
        f"{sum(p.numel() for n, p in model.named_parameters() if n in new_params) / 1e6:.3f} M new)"
    )

    parts = build_dataset(args, two_crops=args.stage == "lpe")
    dataset = torch.utils.data.ConcatDataset(parts)
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochPermutation(len(dataset), args.seed),
        drop_last=len(dataset) >= args.train_batch_size,
    )
    optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    net = accelerator.unwrap_model(model)
    device = accelerator.device
    if contrast is not None:
        contrast.to(device)
        accelerator.register_for_checkpointing(contrast)
    if encoder is not None:
        encoder.to(device)
    if args.stage == "sr" and args.ema_decay > 0:
        ema = EMAModel(net.parameters(), decay=args.ema_decay, foreach=True)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    steps_per_epoch = len(loader)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        saved = {k: v for k, v in vars(args).items()}
        atomic_write_bytes(output_dir / "train_args.json", (json.dumps(saved, indent=2) + "\n").encode())
    global_step = resume_state(accelerator, output_dir, args.resume_from_checkpoint)
    first_epoch = global_step // steps_per_epoch
    resume_step = global_step % steps_per_epoch

    model.train()
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
        epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            torch.manual_seed(args.seed * 1_000_003 + global_step)
            seeds = [int(s) for s in batch["seed"]]
            hr = batch["hr"].float().cpu()
            if args.stage == "lpe":
                both = degrade_mixed(torch.cat([hr, batch["hr_key"].float().cpu()]), seeds + seeds, configs, args.scale)
                query, key = both[: len(seeds)].to(device), both[len(seeds) :].to(device)
                loss, logits = contrast(net, query, key)
                logs = {"loss": loss.item(), "acc": (logits.argmax(1) == 0).float().mean().item()}
            else:
                lr = degrade_mixed(hr, seeds, configs, args.scale).to(device)
                features = None
                if encoder is not None:
                    with torch.no_grad():
                        features = encoder.encode_images(lr)
                sr = model(lr, features)
                loss = F.l1_loss(sr.float(), hr.to(device))
                logs = {"loss": loss.item()}
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            global_step += 1
            if ema is not None:
                ema.step(net.parameters())
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            accelerator.log(logs, step=global_step)
            if global_step % args.logging_steps == 0:
                logger.info(f"step {global_step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step >= args.max_train_steps:
                done = True
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(net.parameters())
        if args.stage == "lpe":
            net.save_pretrained(output_dir / LPE_SUBFOLDER)
        else:
            net.save_pretrained(output_dir / RESTORER_SUBFOLDER)
            if encoder is not None:
                encoder.save_pretrained(
                    output_dir / (CLIP_SUBFOLDER if args.feature_source == "clip" else LPE_SUBFOLDER)
                )
        data = {"hr_size": args.hr_size, "scale": args.scale, "degradations": args.degradations, "steps": global_step}
        atomic_write_bytes(output_dir / "train_data.json", (json.dumps(data, indent=2) + "\n").encode())
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_args())
