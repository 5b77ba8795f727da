"""Train the degradation encoder's controller and the restoration prompt decoder (Accelerate).

HR crops from image folders are degraded on the fly (second-order synthesis with labels and prompt text).
Losses, as in DA-CLIP plus DaLPSR's decoder:
- InfoNCE between the controller's degradation embedding and the CLIP text embedding of the image's
  degradation prompt (images sharing a prompt are all positives);
- BCE between the prompt decoder's per-(type, bin) logits and the multi-hot labels;
- InfoNCE between the content embedding and the caption of the source image, when a caption cache
  (`dalpsr caption` output, keyed by path relative to the training folder) is given.
The open_clip model stays frozen; the controller, zero modules, token head, logit scale and decoder train.

    accelerate launch training/train_degradation_encoder.py --model_config degradation_encoder_tiny.json \
        --train_data_dir HR_DIR --validation_data_dir VAL_DIR --output_dir out/degradation
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


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model_config",
        default="degradation_encoder_tiny.json",
        help="JSON with encoder/decoder/data sections: a path, or a file name in configs/",
    )
    p.add_argument("--pretrained_open_clip", default=None, help="open_clip checkpoint file or tag for the frozen model")
    p.add_argument(
        "--daclip_checkpoint", default=None, help="start from a DA-CLIP checkpoint (e.g. daclip_ViT-B-32.pt)"
    )
    p.add_argument("--train_data_dir", nargs="+", required=True, help="folder(s) of HR images")
    p.add_argument("--validation_data_dir", default=None, help="folder of HR images for validation")
    p.add_argument("--caption_cache", default=None, help="caption cache of the training images (enables content loss)")
    p.add_argument("--caption_model_id", default=None, help="only use captions from this captioning model")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hr_size", type=int, default=None, help="HR crop size (default: config data.hr_size)")
    p.add_argument("--scale", type=int, default=None, help="SR scale (default: config data.scale)")
    p.add_argument("--degradation", default=None, help="degradation preset (default: config data.degradation)")
    p.add_argument("--crops_per_image", type=int, default=8, help="random crops per image per epoch")
    p.add_argument("--recursive", action="store_true", help="include sub-folders of the data folders")
    add_optimization_arguments(
        p, train_batch_size=16, max_train_steps=1000, learning_rate=3e-4, adam_beta2=0.98, adam_weight_decay=0.05,
        adam_epsilon=1e-6,
    )  # fmt: skip
    p.add_argument("--bce_weight", type=float, default=1.0)
    p.add_argument("--degradation_contrastive_weight", type=float, default=1.0)
    p.add_argument("--content_contrastive_weight", type=float, default=1.0)
    p.add_argument("--validation_samples", type=int, default=200)
    add_run_arguments(p)
    args = parse_with_config(p, input_args)
    require_positive(args, COUNT_ARGUMENTS)
    if args.pretrained_open_clip and args.daclip_checkpoint:
        raise ValueError("Give at most one of `--pretrained_open_clip` and `--daclip_checkpoint`.")
    return args


def load_model_config(name_or_path: str) -> dict:
    """A model config from a path, or by file name from the configs shipped in `configs/`."""
    path, cfg = read_model_config(name_or_path)
    unknown = set(cfg) - {"encoder", "decoder", "data"}
    if unknown or "encoder" not in cfg or "decoder" not in cfg:
        raise ValueError(
            f"`--model_config` {path} needs 'encoder' and 'decoder' (and optional 'data') sections; got {sorted(cfg)}."
        )
    return cfg


def multi_positive_infonce(image_embeds: torch.Tensor, texts: list[str], text_embeds: dict, scale: torch.Tensor):
    """Symmetric InfoNCE where every image whose text is identical is a positive.

    Args:
        image_embeds: B×D (normalised here).
        texts: B strings; identical strings share one text embedding.
        text_embeds: {text: normalised D embedding} holding every text of the batch.
        scale: logit scale (already exponentiated).
    """
    unique = sorted(set(texts))
    targets = torch.tensor([unique.index(t) for t in texts], device=image_embeds.device)
    txt = torch.stack([text_embeds[t] for t in unique]).to(image_embeds.device, image_embeds.dtype)
    logits = scale * F.normalize(image_embeds, dim=-1) @ txt.t()  # B×U
    loss_i2t = F.cross_entropy(logits, targets)
    positives = F.one_hot(targets, len(unique)).t().float()  # U×B
    loss_t2i = -(positives / positives.sum(1, keepdim=True) * logits.t().log_softmax(-1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def main(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from dalpsr.data.pairs import HRFolderPairs
    from dalpsr.evaluation.degradation import evaluate_degradation
    from dalpsr.image_io import atomic_write_bytes, list_images, usable_images
    from dalpsr.loaders.degradation import DATA_FILE, DECODER_SUBFOLDER, ENCODER_SUBFOLDER
    from dalpsr.models.degradation_encoder import DegradationEncoder
    from dalpsr.models.prompt_decoder import RestorationPromptDecoder

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

    if args.daclip_checkpoint:
        encoder = DegradationEncoder.from_daclip(
            args.daclip_checkpoint,
            model=cfg["encoder"]["clip_model"],
            **{k: v for k, v in cfg["encoder"].items() if k != "clip_model"},
        )
    elif args.pretrained_open_clip:
        encoder = DegradationEncoder.from_open_clip(
            cfg["encoder"]["clip_model"],
            args.pretrained_open_clip,
            **{k: v for k, v in cfg["encoder"].items() if k != "clip_model"},
        )
    else:
        encoder = DegradationEncoder(**cfg["encoder"])
    encoder.freeze_clip()
    decoder = RestorationPromptDecoder(**cfg["decoder"])
    if decoder.config.embed_dim != encoder.embed_dim:
        raise ValueError(f"decoder embed_dim {decoder.config.embed_dim} != encoder embedding size {encoder.embed_dim}.")
    decoder.encode_candidates(encoder)

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
            config=degradation,
            crops_per_image=args.crops_per_image,
            seed=args.seed,
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
    captions = {}
    if args.caption_cache:
        from dalpsr.captioning import load_captions

        captions = load_captions(args.caption_cache, key="path", model_id=args.caption_model_id)
        logger.info(f"{len(captions)} captions from {args.caption_cache}")

    params = encoder.trainable_parameters() + list(decoder.parameters())
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
    encoder, decoder, optimizer, loader, lr_scheduler = accelerator.prepare(
        encoder, decoder, optimizer, loader, lr_scheduler
    )
    enc = accelerator.unwrap_model(encoder)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("degradation_encoder", config={k: str(v) for k, v in vars(args).items()})
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output_dir / "train_args.json", (json.dumps(vars(args), indent=2) + "\n").encode())

    global_step = resume_state(accelerator, output_dir, args.resume_from_checkpoint)
    first_epoch = global_step // steps_per_epoch
    resume_step = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    text_cache: dict[str, torch.Tensor] = {}

    def text_embeds(texts: list[str]) -> dict[str, torch.Tensor]:
        new = sorted({t for t in texts if t not in text_cache})
        if new:
            with torch.no_grad():
                for text, emb in zip(new, enc.encode_text(new, normalize=True)):
                    text_cache[text] = emb.float()
        return text_cache

    def validate(step: int) -> None:
        if not args.validation_data_dir or not accelerator.is_main_process:
            return
        encoder.eval()
        decoder.eval()
        metrics = evaluate_degradation(
            enc,
            accelerator.unwrap_model(decoder),
            args.validation_data_dir,
            n=args.validation_samples,
            seed=args.seed + 1,
            crop_size=hr_size,
            scale=scale,
            degradation=degradation,
            batch_size=args.train_batch_size,
            recursive=args.recursive,
        )
        encoder.train()
        decoder.train()
        scalars = {f"{name}_bin_acc": m["bin_accuracy"] for name, m in metrics["types"].items()}
        scalars.update({f"mean_{k}": v for k, v in metrics["mean"].items()})
        log_validation(accelerator, output_dir, step, metrics, scalars)

    encoder.train()
    decoder.train()
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
            with accelerator.accumulate(encoder, decoder):
                features = encoder(enc.preprocess(batch["lr"]))
                scale_exp = enc.logit_scale.exp().clamp(max=100.0)
                prompts = list(batch["prompt"])
                loss_deg = multi_positive_infonce(features.degradation_embeds, prompts, text_embeds(prompts), scale_exp)
                logits = decoder(features.degradation_tokens)
                loss_bce = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float())
                loss = args.degradation_contrastive_weight * loss_deg + args.bce_weight * loss_bce
                with_caption = [i for i, s in enumerate(batch["source"]) if s in captions]
                loss_content = torch.zeros((), device=loss.device)
                if len(with_caption) > 1:
                    texts = [captions[batch["source"][i]] for i in with_caption]
                    loss_content = multi_positive_infonce(
                        features.content_embeds[with_caption], texts, text_embeds(texts), scale_exp
                    )
                    loss = loss + args.content_contrastive_weight * loss_content
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {
                "loss": loss.item(),
                "loss_bce": loss_bce.item(),
                "loss_degradation": loss_deg.item(),
                "loss_content": loss_content.item(),
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
        accelerator.unwrap_model(encoder).save_pretrained(output_dir / ENCODER_SUBFOLDER)
        accelerator.unwrap_model(decoder).save_pretrained(output_dir / DECODER_SUBFOLDER)
        data = {"hr_size": hr_size, "scale": scale, "degradation": degradation}
        atomic_write_bytes(output_dir / DATA_FILE, (json.dumps(data, indent=2) + "\n").encode())
        if global_step % args.validation_steps:
            validate(global_step)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_args())
