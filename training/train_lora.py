"""LoRA fine-tuning of the DaLPSR diffusion path (SD2-base UNet and LR ControlNet) with Accelerate + PEFT.

Shaped like the diffusers example scripts (`train_text_to_image_lora.py`, `train_controlnet.py`): `parse_args`
then `main`, Accelerate for devices / mixed precision / gradient accumulation / checkpoints, PEFT LoRA adapters
saved in the diffusers LoRA format. What differs from those examples:

- two trainable networks: LoRA on the UNet and/or the LR ControlNet (or the whole ControlNet);
- training pairs are HR crops degraded on the fly on the training device (Real-ESRGAN second-order presets from
  `dalpsr.degradations`), or HR/LR pairs written by `dalpsr make-pairs`;
- text routing follows `DaLPSRPipeline` ("split"): the image caption drives the ControlNet cross-attention, the
  degradation prompt plus quality words drive the UNet's; prompt dropout empties both texts of a sample together
  (the unconditional branch of classifier-free guidance also gives both networks the same text);
- every random draw (data order, crops, flips, degradations, VAE sampling, noise, timesteps, dropout) comes from
  generators seeded by (--seed, process, epoch, batch), so a run resumed from a checkpoint reproduces the
  uninterrupted run;
- checkpoints hold only the trained weights (LoRA layers, or the ControlNet) plus optimizer / scheduler / RNG state,
  and are written under a temporary name and renamed when complete;
- `lora_alpha / rank` is folded into the saved `lora_B` matrices, so the saved file loads with
  `DaLPSRPipeline.load_lora_weights` (which assumes alpha = rank) and reproduces the trained model exactly;
- a pipeline with SeeSR image cross-attention (`--pipeline_dir` of a `DaLPSRPipeline.from_seesr` save) gets the
  LR image embeddings of its image encoder in both networks, as in the pipeline.

Usage:
    accelerate launch training/train_lora.py --config configs/train_lora_sd2.json \\
        --pretrained_model_name_or_path /models/sd2-base --train_data_dir /data/hr --output_dir runs/lora
    accelerate launch --multi_gpu training/train_lora.py --config ... --resume_from_checkpoint latest
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dalpsr.data import HRFolderPairs, PairsFolder
from dalpsr.degradations.config import PRESETS
from dalpsr.image_io import RGBImage, atomic_write_bytes, list_images, read_image_size, save_image_atomic, usable_images
from dalpsr.pipelines.pipeline_dalpsr import DEFAULT_QUALITY_PROMPT, TEXT_ROUTINGS, DaLPSRPipeline, route_prompts
from dalpsr.runtime import atomic_directory, derive_seed, mix_seed, seeded_generator
from dalpsr.training_utils import log_validation, parse_with_config, resolve_checkpoint, resume_state, save_checkpoint

LORA_TARGETS = ("unet", "controlnet")
DEFAULT_TARGET_MODULES = "to_q,to_k,to_v,to_out.0"
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
ARGS_FILE = "training_args.json"
UNET_LORA_FILE = "unet_lora.safetensors"
CONTROLNET_LORA_FILE = "controlnet_lora.safetensors"

logger = logging.getLogger("train_lora")


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option can also be given in a `--config` JSON file under its `dest` name."""
    p = argparse.ArgumentParser(
        description="LoRA fine-tuning of the DaLPSR UNet and LR ControlNet (Accelerate + PEFT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help="JSON file mapping option names (as below, without dashes) to values; flags on the command line win.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None, help="SD2-base folder (diffusers layout).")
    g.add_argument(
        "--controlnet_model_name_or_path",
        default=None,
        help="ControlNet folder to start from; default: a fresh LR branch copied from the UNet.",
    )
    g.add_argument("--pipeline_dir", default=None, help="a saved DaLPSRPipeline, instead of the two options above.")
    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None, help="folder of HR images, degraded on the fly.")
    g.add_argument("--pairs_dir", default=None, help="folder written by `dalpsr make-pairs` (metadata.jsonl).")
    g.add_argument("--degradation_preset", default="realesrgan", choices=PRESETS, help="for --train_data_dir.")
    g.add_argument("--crops_per_image", type=int, default=1, help="random crops per HR image per epoch.")
    g.add_argument(
        "--recursive",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="include sub-folders of --train_data_dir.",
    )
    g.add_argument(
        "--caption_cache",
        default=None,
        help="caption cache (`dalpsr caption`) of --train_data_dir, or of the pairs' source or hr/ folder.",
    )
    g.add_argument("--default_caption", default="", help="caption of images missing from the cache.")
    g.add_argument("--resolution", type=int, default=512, help="HR crop size in pixels.")
    g.add_argument("--scale", type=int, default=4, help="SR scale: LR crops are resolution / scale.")
    g.add_argument(
        "--random_flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips."
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g = p.add_argument_group("text")
    g.add_argument("--quality_prompt", default=DEFAULT_QUALITY_PROMPT, help="words appended to the UNet text.")
    g.add_argument("--text_routing", default="split", choices=TEXT_ROUTINGS, help="as in DaLPSRPipeline.")
    g.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="fraction of samples trained with empty texts (both networks), for classifier-free guidance.",
    )
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_targets", default="unet,controlnet", help="comma list of: unet, controlnet (or empty).")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    g.add_argument("--lora_target_modules", default=DEFAULT_TARGET_MODULES, help="comma list of module names.")
    g.add_argument(
        "--train_controlnet_full",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train every ControlNet weight.",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", default=None, help="where checkpoints, validation images and weights go.")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=4, help="per device.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides the epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument(
        "--scale_lr",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="multiply the lr by batch × accumulation × processes.",
    )
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="for cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="for polynomial.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's.")
    g.add_argument(
        "--allow_tf32", action=argparse.BooleanOptionalAction, default=False, help="TF32 matmuls on Ampere+ GPUs."
    )
    g.add_argument("--enable_xformers_memory_efficient_attention", action=argparse.BooleanOptionalAction, default=False)
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='"latest" (starts fresh when there is none) or a checkpoint-N folder (path or name in --output_dir).',
    )
    g.add_argument("--report_to", default="none", help='"none", "tensorboard", "wandb", "all", ... (accelerate).')
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir.")
    g = p.add_argument_group("validation")
    g.add_argument(
        "--validation_image", nargs="*", default=None, help="LR images to super-resolve (none: no validation)."
    )
    g.add_argument("--validation_prompt", default=None, help="content prompt for the validation images.")
    g.add_argument("--validation_degradation_prompt", default=None, help="degradation prompt for them.")
    g.add_argument("--validation_steps", type=int, default=500, help="validate every this many steps.")
    g.add_argument("--validation_num_inference_steps", type=int, default=20)
    g.add_argument("--validation_guidance_scale", type=float, default=5.5)
    return p


def split_list(text: str | None) -> list[str]:
    """Comma-separated text → list of stripped, non-empty items."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _positive(args, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"`--{name}` must be {'>= 0' if allow_zero else '> 0'}; got {value!r}.")


def check_args(args: argparse.Namespace) -> None:
    """Validate parsed arguments; raises ValueError naming the option, the value and what is allowed."""
    if not args.output_dir:
        raise ValueError("`--output_dir` is required (on the command line or in the `--config` file).")
    if args.pipeline_dir and (args.pretrained_model_name_or_path or args.controlnet_model_name_or_path):
        raise ValueError(
            "Give either `--pipeline_dir` or `--pretrained_model_name_or_path` (with an optional "
            "`--controlnet_model_name_or_path`), not both."
        )
    if not args.pipeline_dir and not args.pretrained_model_name_or_path:
        raise ValueError("One of `--pretrained_model_name_or_path` (SD2-base folder) or `--pipeline_dir` is required.")
    for name in ("pipeline_dir", "pretrained_model_name_or_path", "controlnet_model_name_or_path"):
        value = getattr(args, name)
        if value and not Path(value).is_dir():
            raise ValueError(f"`--{name}` must be an existing folder (no hub downloads here); got {value!r}.")
    if bool(args.train_data_dir) == bool(args.pairs_dir):
        raise ValueError(
            "Give exactly one of `--train_data_dir` (HR folder, degraded on the fly) or `--pairs_dir` "
            f"(make-pairs folder); got train_data_dir={args.train_data_dir!r}, pairs_dir={args.pairs_dir!r}."
        )
    if args.pipeline_dir and not (Path(args.pipeline_dir) / "model_index.json").is_file():
        raise ValueError(
            f"`--pipeline_dir` must be a folder written by `DaLPSRPipeline.save_pretrained` (with model_index.json); "
            f"got {args.pipeline_dir!r}."
        )
    data_dir = args.train_data_dir or args.pairs_dir
    if not Path(data_dir).is_dir():
        flag = "train_data_dir" if args.train_data_dir else "pairs_dir"
        raise ValueError(f"`--{flag}` must be an existing folder; got {data_dir!r}.")
    if args.caption_cache and not Path(args.caption_cache).is_file():
        raise ValueError(f"`--caption_cache` file not found: {args.caption_cache!r}.")
    _positive(
        args,
        "resolution",
        "scale",
        "crops_per_image",
        "rank",
        "lora_alpha",
        "train_batch_size",
        "num_train_epochs",
        "max_train_steps",
        "gradient_accumulation_steps",
        "learning_rate",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "validation_num_inference_steps",
    )
    _positive(
        args,
        "lr_warmup_steps",
        "dataloader_num_workers",
        "adam_weight_decay",
        "adam_epsilon",
        "max_grad_norm",
        "validation_guidance_scale",
        allow_zero=True,
    )
    if args.resolution % args.scale:
        raise ValueError(f"`--resolution` must be a multiple of `--scale` ({args.scale}); got {args.resolution}.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(f"`--proportion_empty_prompts` must be in [0, 1]; got {args.proportion_empty_prompts}.")
    targets = split_list(args.lora_targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or len(set(targets)) != len(targets):
        raise ValueError(f"`--lora_targets` must be a comma list of {LORA_TARGETS}; got {args.lora_targets!r}.")
    if args.train_controlnet_full and "controlnet" in targets:
        raise ValueError(
            "`--train_controlnet_full` trains every ControlNet weight; drop 'controlnet' from `--lora_targets` "
            f"(got {args.lora_targets!r})."
        )
    if not targets and not args.train_controlnet_full:
        raise ValueError("Nothing to train: `--lora_targets` is empty and `--train_controlnet_full` is off.")
    if targets and not split_list(args.lora_target_modules):
        raise ValueError(f"`--lora_target_modules` must name at least one module; got {args.lora_target_modules!r}.")
    for image in args.validation_image or []:
        if not Path(image).is_file():
            raise ValueError(f"`--validation_image` file not found: {image!r}.")
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        path = resolve_checkpoint(Path(args.output_dir), resume)
        if path is None:
            raise ValueError(
                f"`--resume_from_checkpoint` must be 'latest' or an existing checkpoint-N folder (a path, or a name "
                f"inside --output_dir); got {resume!r}."
            )


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line flags (`input_args`, default sys.argv) over the values of an optional `--config` file."""
    args = parse_with_config(build_parser(), input_args)
    check_args(args)
    return args


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


class TrainPairs(Dataset):
    """Training items from an HR folder (degraded later, on the device) or a make-pairs folder, with captions.

    Items are dicts: "hr" (3×S×S in [0, 1]), "caption", "name", and either "seed" (HR folder: the degradation
    seed for `dalpsr.degradations.degrade`) or "lr" (3×S/s×S/s) and "prompt" (pairs folder). The order is a
    permutation drawn from (`seed`, epoch); crops and flips are drawn per item from (`seed`, epoch, item), so an
    epoch's items do not depend on the number of processes, workers or interruptions.

    Caption keys: the image path relative to the HR folder; for pairs, the record's "source" (the path relative to
    the HR folder make-pairs read), its "hr" path (relative to the pairs folder) or the hr file name.

    Args:
        train_data_dir: HR folder (exclusive with `pairs_dir`).
        pairs_dir: make-pairs folder.
        resolution: HR crop size.
        scale: SR scale.
        preset: degradation preset name (HR folder only).
        crops_per_image: crops per HR image per epoch (HR folder only).
        recursive: include sub-folders (HR folder only).
        captions: {key: caption} from `dalpsr.captioning.load_captions`.
        default_caption: caption of items without one.
        random_flip: random horizontal flips.
        seed: base seed.
    """

    def __init__(
        self,
        *,
        train_data_dir: str | None = None,
        pairs_dir: str | None = None,
        resolution: int,
        scale: int,
        preset: str = "realesrgan",
        crops_per_image: int = 1,
        recursive: bool = False,
        captions: dict[str, str] | None = None,
        default_caption: str = "",
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.resolution, self.scale, self.seed = resolution, scale, seed
        self.random_flip = random_flip
        self.skipped: list[tuple[str, str]] = []
        captions = captions or {}
        if train_data_dir:
            root = Path(train_data_dir)
            kept, skipped = usable_images(list_images([root], recursive=recursive), resolution)
            self.skipped.extend(skipped)
            self.base = HRFolderPairs(
                train_data_dir,
                size=resolution,
                scale=scale,
                config=preset,
                crops_per_image=crops_per_image,
                seed=seed,
                degrade=False,
                paths=kept,
            )
            keys = [[p.relative_to(root).as_posix()] for p in kept]
            self.captions = [self._caption(k, captions, default_caption) for k in keys for _ in range(crops_per_image)]
        else:
            root = Path(pairs_dir)
            kept = []
            for record in PairsFolder(pairs_dir).records:
                hr_size, lr_size = read_image_size(root / record["hr"]), read_image_size(root / record["lr"])
                if hr_size is None or lr_size is None:
                    self.skipped.append((record["hr"], "unreadable hr or lr file"))
                elif hr_size != (lr_size[0] * scale, lr_size[1] * scale):
                    self.skipped.append((record["hr"], f"hr {hr_size} is not {scale}× lr {lr_size}"))
                elif min(hr_size) < resolution:
                    self.skipped.append((record["hr"], f"{hr_size} is smaller than --resolution {resolution}"))
                else:
                    kept.append(record)
            self.base = PairsFolder(pairs_dir, records=kept)
            keys = [[r.get("source"), r["hr"], Path(r["hr"]).name] for r in kept]
            self.captions = [self._caption(k, captions, default_caption) for k in keys]
        self.num_captioned = sum(c is not None for c in self.captions)
        self.captions = [default_caption if c is None else c for c in self.captions]
        if len(self) == 0:
            reasons = "; ".join(f"{p}: {why}" for p, why in self.skipped[:5])
            raise ValueError(f"No usable training images in {train_data_dir or pairs_dir!r} ({reasons}).")
        self.set_epoch(0)

    @staticmethod
    def _caption(keys: list[str | None], captions: dict[str, str], default: str) -> str | None:
        for key in keys:
            if key is not None and key in captions:
                return captions[key]
        return None

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        """New order, crops, flips and degradations for `epoch` (Accelerate's loaders call this on iteration)."""
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(self.epoch)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        self.order = torch.randperm(len(self), generator=g).tolist()

    def __getitem__(self, index: int) -> dict:
        j = self.order[index]
        item = self.base[j]
        item_seed = derive_seed(mix_seed(self.seed, self.epoch), "item", j)
        item["caption"] = self.captions[j]
        hr = item["hr"]
        if "lr" in item:
            g = torch.Generator().manual_seed(item_seed)
            s, lr_s = self.resolution, self.resolution // self.scale
            _, h, w = item["lr"].shape
            top = int(torch.randint(0, h - lr_s + 1, (1,), generator=g))
            left = int(torch.randint(0, w - lr_s + 1, (1,), generator=g))
            item["lr"] = item["lr"][:, top : top + lr_s, left : left + lr_s]
            hr = hr[:, top * self.scale : top * self.scale + s, left * self.scale : left * self.scale + s]
            item.pop("labels", None)
        if self.random_flip and item_seed & 1:
            hr = hr.flip(-1)
            if "lr" in item:
                item["lr"] = item["lr"].flip(-1)
        item["hr"] = hr.contiguous()
        if "lr" in item:
            item["lr"] = item["lr"].contiguous()
        return item


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def batch_generator(seed: int, process_index: int, epoch: int, step: int) -> torch.Generator:
    """CPU generator for one micro-batch's noise, timesteps, VAE sampling and prompt dropout."""
    return seeded_generator(mix_seed(seed, process_index), f"batch/{epoch}", step)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors as safetensors, atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(path, data)


def lora_layers(model: torch.nn.Module, scaling: float) -> dict[str, torch.Tensor]:
    """PEFT LoRA state dict of `model` with `scaling` (alpha / rank) folded into the lora_B matrices."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    if scaling != 1.0:
        state = {k: v * scaling if ".lora_B." in k else v for k, v in state.items()}
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_into(model: torch.nn.Module, path: Path) -> None:
    """Load a raw PEFT LoRA file written by the checkpoint hook into `model` (same adapter layout required)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(path)
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        raise ValueError(
            f"{path} was written with other LoRA settings (--rank / --lora_target_modules / --lora_targets): "
            f"{len(set(state) ^ expected)} keys differ."
        )
    set_peft_model_state_dict(model, state, adapter_name="default")


def is_blank_controlnet(controlnet: torch.nn.Module) -> bool:
    """True when every output ("zero") convolution of the ControlNet is zero, as in a fresh `from_unet` copy."""
    convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    return all(not c.weight.any() and (c.bias is None or not c.bias.any()) for c in convs)


def json_args(args: argparse.Namespace) -> dict:
    """The run's arguments as a `--config`-compatible dict."""
    return {k: v for k, v in vars(args).items() if k != "config"}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    """Train; returns {"global_step", "initial_global_step", "losses" (per optimizer step), "output_dir"}."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils.torch_utils import randn_tensor
    from peft import LoraConfig
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from dalpsr.degradations import degrade, preset

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / ARGS_FILE, json.dumps(json_args(args), indent=2).encode())
        for stale in output_dir.glob("checkpoint-*.partial"):
            shutil.rmtree(stale)

    # Models: load on the CPU, freeze, add adapters (seeded), then move.
    if args.pipeline_dir:
        pipe = DaLPSRPipeline.from_pretrained(args.pipeline_dir)
    else:
        pipe = DaLPSRPipeline.from_sd2(
            args.pretrained_model_name_or_path, controlnet=args.controlnet_model_name_or_path
        )
    pipe.set_progress_bar_config(disable=True)
    if args.resolution % pipe.pad_multiple:
        raise ValueError(
            f"`--resolution` must be a multiple of {pipe.pad_multiple} for this model (VAE factor × UNet levels); "
            f"got {args.resolution}."
        )
    vae, text_encoder, unet, controlnet = pipe.vae, pipe.text_encoder, pipe.unet, pipe.controlnet
    image_encoder = pipe.image_encoder  # SeeSR-style image cross-attention (e.g. `from_seesr` weights), else None
    if is_blank_controlnet(controlnet) and not args.train_controlnet_full:
        raise ValueError(
            "The ControlNet's output convolutions are all zero (a fresh LR branch copied from the UNet): it passes no "
            "LR information and blocks every gradient to LoRA layers inside it. Train it with "
            "`--train_controlnet_full` (e.g. with `--lora_targets unet`) or start from a trained LR ControlNet "
            "(`--controlnet_model_name_or_path`)."
        )
    for model in (vae, text_encoder, unet, controlnet, image_encoder):
        if model is not None:
            model.requires_grad_(False)
    targets = split_list(args.lora_targets)
    lora_alpha = args.lora_alpha if args.lora_alpha is not None else float(args.rank)
    scaling = lora_alpha / args.rank
    if targets:
        lora_config = LoraConfig(
            r=args.rank,
            lora_alpha=lora_alpha,
            init_lora_weights="gaussian",
            target_modules=split_list(args.lora_target_modules),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # LoRA A matrices: PEFT draws them from the global generator
            for name in targets:
                {"unet": unet, "controlnet": controlnet}[name].add_adapter(lora_config)
    if args.train_controlnet_full:
        controlnet.requires_grad_(True)
    train_unet = "unet" in targets
    train_controlnet = "controlnet" in targets or args.train_controlnet_full
    if args.enable_xformers_memory_efficient_attention:
        pipe.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_controlnet:
            controlnet.enable_gradient_checkpointing()

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    placements = ((vae, weight_dtype), (text_encoder, weight_dtype), (unet, weight_dtype))
    placements += ((controlnet, torch.float32 if args.train_controlnet_full else weight_dtype),)
    if image_encoder is not None:
        placements += ((image_encoder, weight_dtype),)
    for model, dtype in placements:  # a dtype cast only when needed (diffusers warns on every `.to(dtype)`)
        if model.dtype == dtype:
            model.to(device)
        else:
            model.to(device, dtype=dtype)
    trained = [m for m, on in ((unet, train_unet), (controlnet, train_controlnet)) if on]
    cast_training_params(trained, dtype=torch.float32)  # trainable weights stay fp32 under mixed precision
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"The scheduler's `prediction_type` must be epsilon or v_prediction; got {prediction_type!r}.")
    degradation = preset(args.degradation_preset, scale=args.scale) if args.train_data_dir else None

    # Checkpoints hold only the trained weights (plus optimizer / scheduler / RNG state from Accelerate).
    def save_model_hook(models, weights, folder):
        if accelerator.is_main_process:
            folder = Path(folder)
            layers = {}
            for model in models:
                model = accelerator.unwrap_model(model)
                if isinstance(model, UNet2DConditionModel):
                    save_safetensors(lora_layers(model, 1.0), folder / UNET_LORA_FILE)
                    layers["unet_lora_layers"] = lora_layers(model, scaling)
                elif args.train_controlnet_full:
                    model.save_pretrained(folder / "controlnet")
                else:
                    save_safetensors(lora_layers(model, 1.0), folder / CONTROLNET_LORA_FILE)
                    layers["controlnet_lora_layers"] = lora_layers(model, scaling)
            if layers:  # the checkpoint also loads into a pipeline with `load_lora_weights(checkpoint)`
                DaLPSRPipeline.save_lora_weights(folder, **layers, save_function=save_safetensors)
        weights.clear()

    def load_model_hook(models, folder):
        folder = Path(folder)
        while models:
            model = accelerator.unwrap_model(models.pop())
            if isinstance(model, UNet2DConditionModel):
                load_lora_into(model, folder / UNET_LORA_FILE)
            elif args.train_controlnet_full:
                state = load_file(folder / "controlnet" / "diffusion_pytorch_model.safetensors")
                model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
            else:
                load_lora_into(model, folder / CONTROLNET_LORA_FILE)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # Data.
    captions = {}
    if args.caption_cache:
        from dalpsr.captioning import load_captions

        captions = load_captions(args.caption_cache)
    train_set = TrainPairs(
        train_data_dir=args.train_data_dir,
        pairs_dir=args.pairs_dir,
        resolution=args.resolution,
        scale=args.scale,
        preset=args.degradation_preset,
        crops_per_image=args.crops_per_image,
        recursive=args.recursive,
        captions=captions,
        default_caption=args.default_caption,
        random_flip=args.random_flip,
        seed=args.seed,
    )
    for path, why in train_set.skipped:
        logger.warning("skipped %s: %s", path, why)
    if args.caption_cache:
        if train_set.num_captioned == 0:
            raise ValueError(
                f"`--caption_cache` {args.caption_cache} has no caption for any training image (keys are paths "
                "relative to the captioned folder); caption the training folder itself."
            )
        logger.info("captions for %d of %d training items", train_set.num_captioned, len(train_set))
    train_loader = DataLoader(
        train_set,
        batch_size=args.train_batch_size,
        shuffle=False,  # the order is a seeded per-epoch permutation inside the dataset
        num_workers=args.dataloader_num_workers,
        drop_last=False,
    )

    # Optimizer and schedule.
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    prepared = accelerator.prepare(*trained, optimizer, train_loader, lr_scheduler)
    wrapped = dict(zip([id(m) for m in trained], prepared[: len(trained)]))
    optimizer, train_loader, lr_scheduler = prepared[len(trained) :]
    unet_fwd, controlnet_fwd = wrapped.get(id(unet), unet), wrapped.get(id(controlnet), controlnet)
    trained_fwd = list(wrapped.values())
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)

    if accelerator.is_main_process:
        tracker_config = {
            k: ("" if v is None else ",".join(v) if isinstance(v, list) else v) for k, v in json_args(args).items()
        }
        accelerator.init_trackers("dalpsr-train-lora", config=tracker_config)

    # Resume.
    global_step = resume_state(accelerator, output_dir, args.resume_from_checkpoint)
    initial_global_step = global_step
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    logger.info(
        "training %s on %d items: %d epochs, %d steps, batch %d × %d processes × %d accumulation",
        " + ".join(targets + (["controlnet (full)"] if args.train_controlnet_full else [])),
        len(train_set),
        num_epochs,
        max_train_steps,
        args.train_batch_size,
        accelerator.num_processes,
        args.gradient_accumulation_steps,
    )

    def compute_loss(batch: dict, g: torch.Generator) -> torch.Tensor:
        hr = batch["hr"].to(device)  # B×3×S×S in [0, 1]
        bsz = hr.shape[0]
        if "lr" in batch:
            lr, degradation_prompts = batch["lr"].to(device), list(batch["prompt"])
        else:
            out = degrade(hr, degradation, scale=args.scale, seeds=batch["seed"].tolist())
            lr, degradation_prompts = out.lr, out.prompts  # B×3×S/s×S/s
        # The LR-branch condition and (SeeSR weights only) the image embeddings exactly as the pipeline prepares
        # them: `prepare_image` (bicubic upsampling, clamp, padding) and `_image_attention_kwargs` ({} without
        # image cross-attention).
        lr_images = [RGBImage(x) for x in lr]
        _, cond = pipe.prepare_image(lr_images, args.scale, device, weight_dtype)
        with torch.no_grad():
            image_kwargs = pipe.image_attention_kwargs(lr_images, device, weight_dtype, do_cfg=False)
        cn_texts, unet_texts = route_prompts(
            list(batch["caption"]), degradation_prompts, args.quality_prompt, args.text_routing
        )
        drop = (torch.rand(bsz, generator=g) < args.proportion_empty_prompts).tolist()
        cn_texts = ["" if d else t for d, t in zip(drop, cn_texts)]
        unet_texts = ["" if d else t for d, t in zip(drop, unet_texts)]
        unet_embeds = pipe.encode_prompt(unet_texts, device)[0].to(weight_dtype)  # B×77×D
        cn_embeds = unet_embeds if cn_texts == unet_texts else pipe.encode_prompt(cn_texts, device)[0].to(weight_dtype)
        with torch.no_grad():
            posterior = vae.encode(hr.to(weight_dtype) * 2 - 1).latent_dist
            latents = posterior.sample(generator=g) * vae.config.scaling_factor  # B×4×S/8×S/8
        noise = randn_tensor(latents.shape, generator=g, device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=g).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with nullcontext() if train_controlnet else torch.no_grad():
            down, mid = controlnet_fwd(
                noisy,
                timesteps,
                encoder_hidden_states=cn_embeds,
                controlnet_cond=cond,
                return_dict=False,
                **image_kwargs,
            )
        pred = unet_fwd(
            noisy,
            timesteps,
            encoder_hidden_states=unet_embeds,
            down_block_additional_residuals=[d.to(weight_dtype) for d in down],
            mid_block_additional_residual=mid.to(weight_dtype),
            return_dict=False,
            **image_kwargs,
        )[0]
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    validated: set[int] = set()

    def validate(step: int) -> None:
        if not args.validation_image or step in validated:
            return
        validated.add(step)
        val_pipe = DaLPSRPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=pipe.tokenizer,
            unet=accelerator.unwrap_model(unet_fwd),
            controlnet=accelerator.unwrap_model(controlnet_fwd),
            scheduler=pipe.scheduler,
            image_encoder=image_encoder,
        )
        val_pipe.set_progress_bar_config(disable=True)
        # Accelerate makes a trained (prepared) ControlNet return fp32 under mixed precision; hand its residuals
        # to the UNet in the UNet's dtype, as `compute_loss` does (CPU autocast does not reconcile them).
        handle = None
        if train_controlnet and weight_dtype != torch.float32:

            def residuals_to_unet_dtype(module, inputs, output):
                down, mid = output
                return [d.to(weight_dtype) for d in down], mid.to(weight_dtype)

            handle = val_pipe.controlnet.register_forward_hook(residuals_to_unet_dtype)
        folder = output_dir / "validation" / f"step-{step:06d}"
        try:
            for i, image in enumerate(args.validation_image):
                with accelerator.autocast():
                    result = val_pipe(
                        image,
                        prompt=args.validation_prompt,
                        degradation_prompt=args.validation_degradation_prompt,
                        quality_prompt=args.quality_prompt,
                        text_routing=args.text_routing,
                        upscale=args.scale,
                        num_inference_steps=args.validation_num_inference_steps,
                        guidance_scale=args.validation_guidance_scale,
                        generator=torch.Generator().manual_seed(args.seed),
                    )
                save_image_atomic(result.images[0], folder / f"{i:02d}_{Path(image).stem}.png")
        finally:
            if handle is not None:
                handle.remove()
        images = sorted(str(p.relative_to(output_dir)) for p in folder.glob("*.png"))
        log_validation(accelerator, output_dir, step, {"images": images}, {"images": float(len(images))})

    losses: list[float] = []
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    for model in trained_fwd:
        model.train()
    running, micro_steps = 0.0, 0
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        train_loader.set_epoch(epoch)
        loader, start = train_loader, 0
        if epoch == first_epoch and skip_batches:
            loader, start = accelerator.skip_first_batches(train_loader, skip_batches), skip_batches
            loader.set_epoch(epoch)
        for step, batch in enumerate(loader, start=start):
            g = batch_generator(args.seed, accelerator.process_index, epoch, step)
            with accelerator.accumulate(*trained_fwd):
                with accelerator.autocast():
                    loss = compute_loss(batch, g)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running += accelerator.gather(loss.detach().reshape(1)).mean().item()
            micro_steps += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            step_loss = running / micro_steps  # mean over the accumulated micro-batches and processes
            running, micro_steps = 0.0, 0
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"The training loss is {step_loss} at step {global_step}.")
            losses.append(step_loss)
            progress.set_postfix(loss=f"{step_loss:.4f}")
            accelerator.log({"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if accelerator.is_main_process and global_step % args.validation_steps == 0:
                validate(global_step)
            if global_step >= max_train_steps:
                break
    progress.close()

    # Final weights, run args, last validation.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        layers = {}
        if train_unet:
            layers["unet_lora_layers"] = lora_layers(accelerator.unwrap_model(unet_fwd), scaling)
        if "controlnet" in targets:
            layers["controlnet_lora_layers"] = lora_layers(accelerator.unwrap_model(controlnet_fwd), scaling)
        if layers:
            DaLPSRPipeline.save_lora_weights(output_dir, **layers, save_function=save_safetensors)
        if args.train_controlnet_full:
            with atomic_directory(output_dir / "controlnet", overwrite=True) as tmp:
                accelerator.unwrap_model(controlnet_fwd).save_pretrained(tmp)
        atomic_write_bytes(output_dir / ARGS_FILE, json.dumps(json_args(args), indent=2).encode())
        validate(global_step)
        logger.info("saved the trained weights in %s", output_dir)
    accelerator.end_training()
    return {
        "global_step": global_step,
        "initial_global_step": initial_global_step,
        "losses": losses,
        "output_dir": str(output_dir),
    }


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as err:
        sys.exit(f"error: {err}")
