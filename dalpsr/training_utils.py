"""Pieces shared by the training scripts (`training/train_*.py`): checkpoint folders, run arguments and configs,
and the resumable epoch order.

A checkpoint is written as `checkpoint-N.partial` and renamed to `checkpoint-N` once complete, so an interrupted
save never looks like a checkpoint to `--resume_from_checkpoint latest`; old checkpoints beyond the limit are removed
only after the new one is in place.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from torch.utils.data import Sampler

from dalpsr.package_data import package_data
from dalpsr.runtime import mix_seed

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-N` folders in `output_dir`, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_checkpoint(output_dir: str | Path, value: str) -> Path | None:
    """The folder for `--resume_from_checkpoint`: "latest" → highest step (None when there is none), else a
    `checkpoint-N` folder given as a path or as a name inside `output_dir` (None when it does not exist)."""
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(value), Path(output_dir) / value):
        if candidate.is_dir() and CHECKPOINT_RE.match(candidate.name):
            return candidate
    return None


def checkpoint_step(path: str | Path) -> int:
    """N of a `checkpoint-N` folder."""
    match = CHECKPOINT_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"`path` must name a checkpoint-N folder; got {str(path)!r}.")
    return int(match.group(1))


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into `checkpoint-{step}` atomically, then keep at most `total_limit` checkpoints.

    Call it on every process (each saves its RNG state); the main process renames and prunes.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        logger.info("saved %s", final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume_state(accelerator, output_dir: str | Path, value: str | None) -> int:
    """Restore `accelerator` from `--resume_from_checkpoint` (`value`) and return the global step (0: fresh run).

    "latest" with no checkpoint starts a fresh run; any other value must name an existing checkpoint-N folder.
    """
    if not value:
        return 0
    path = resolve_checkpoint(output_dir, value)
    if path is None:
        if value != "latest":
            raise FileNotFoundError(
                f"`--resume_from_checkpoint` {value!r} is not a checkpoint-N folder (a path, or a name in "
                f"{output_dir}); use 'latest' to resume from the newest one."
            )
        logger.info("no checkpoint in %s; starting a new run", output_dir)
        return 0
    accelerator.load_state(str(path))
    logger.info("resumed from %s", path)
    return checkpoint_step(path)


def log_validation(accelerator, output_dir: str | Path, step: int, metrics: dict, scalars: dict[str, float]) -> Path:
    """The one validation record of every training script: `validation/step-N.json` (all of `metrics`, written
    atomically), `scalars` to the trackers under `val/`, and one log line. Returns the JSON path."""
    from dalpsr.image_io import atomic_write_bytes

    path = Path(output_dir) / "validation" / f"step-{step}.json"
    atomic_write_bytes(path, (json.dumps({"step": step, **metrics}, indent=2) + "\n").encode())
    accelerator.log({f"val/{k}": v for k, v in scalars.items()}, step=step)
    logger.info(f"validation step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
    return path


def add_optimization_arguments(
    p: argparse.ArgumentParser,
    *,
    train_batch_size: int = 8,
    max_train_steps: int = 2000,
    learning_rate: float = 2e-4,
    adam_beta2: float = 0.99,
    adam_weight_decay: float = 0.0,
    adam_epsilon: float = 1e-8,
) -> None:
    """Batch, step count, AdamW and LR schedule flags shared by the regression training scripts (their defaults
    differ per script)."""
    p.add_argument("--train_batch_size", type=int, default=train_batch_size)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--max_train_steps", type=int, default=max_train_steps)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--lr_scheduler", default="cosine", help="diffusers scheduler name (constant, cosine, ...)")
    p.add_argument("--lr_warmup_steps", type=int, default=50)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=adam_beta2)
    p.add_argument("--adam_weight_decay", type=float, default=adam_weight_decay)
    p.add_argument("--adam_epsilon", type=float, default=adam_epsilon)
    p.add_argument("--max_grad_norm", type=float, default=1.0)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Precision, checkpointing, resuming, validation/logging cadence and tracking: the same in every script.

    Also `--config RUN.json`: argument values (names without dashes) read before the command line, which wins.
    """
    p.add_argument("--config", default=None, help="JSON file of argument values; flags given on the command line win")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint-N folder or "latest"')
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--report_to", default=None, help="accelerate tracker (tensorboard, wandb, ...); none by default")


def parse_with_config(parser: argparse.ArgumentParser, input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse `input_args` (default sys.argv) over the values of an optional `--config` file (the one convention of
    every training script)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(input_args)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(input_args)


def _config_value_error(path, key: str, expected: str, value) -> ValueError:
    return ValueError(f"`{key}` in the config file {path} must be {expected}; got {value!r}.")


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a `--config` JSON file: option names (without dashes) → values, checked against the parser."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"`--config` file not found: {path}.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"`--config` file {path} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ValueError(f"`--config` file {path} must hold a JSON object; got {type(config).__name__}.")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise ValueError(f"`--config` file {path} has unknown options {unknown}; allowed: {sorted(actions)}.")
    for key, value in config.items():
        action = actions[key]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise _config_value_error(path, key, "true or false", value)
            continue
        values = value if action.nargs == "*" else [value]
        if action.nargs == "*" and not isinstance(value, list):
            raise _config_value_error(path, key, "a list", value)
        for v in values:
            if action.type is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise _config_value_error(path, key, "an integer", v)
            if action.type is float and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise _config_value_error(path, key, "a number", v)
            if action.type is None and not isinstance(v, str):
                raise _config_value_error(path, key, "a string", v)
            if action.choices is not None and v not in action.choices:
                raise _config_value_error(path, key, f"one of {list(action.choices)}", v)
    return config


# counts both training scripts take and require to be positive
COUNT_ARGUMENTS = (
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "checkpointing_steps",
    "validation_steps",
    "validation_samples",
    "crops_per_image",
    "logging_steps",
)


def require_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """ValueError naming the first of `names` (argument names) that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1; got {getattr(args, name)}.")


def read_model_config(name_or_path: str) -> tuple[Path, dict]:
    """(path, parsed JSON) of a run config: a file path, or a file name among the shipped `configs/`."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = package_data("configs", name_or_path)
        if not shipped.is_file():
            raise FileNotFoundError(f"`--model_config` {name_or_path!r} is neither a file nor a config in configs/.")
        path = shipped
    return path, json.loads(path.read_text())


class EpochPermutation(Sampler):
    """A fresh permutation per epoch from (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())
