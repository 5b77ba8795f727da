"""DA-CLIP style degradation encoder: a frozen open_clip ViT steered by a trainable controller.

Adapted from DA-CLIP (Luo et al., "Controlling Vision-Language Models for Multi-Task Image Restoration",
ICLR 2024; github.com/Algolzw/daclip-uir). Wiring as in DA-CLIP's `DaCLIP.encode_image(control=True)`:
- the controller is a copy of the vision tower (patch embedding, class/positional embeddings, ln_pre,
  blocks, ln_post, proj);
- after controller block i, the block output passes through zero-initialised `Linear(width, width)`
  ("zero module" i); the controller's own residual stream is NOT changed by it;
- the frozen tower adds the output of zero module L-1-i to the output of its own block i (reversed
  order: the last controller block steers the first tower block);
- degradation embedding = the controller's pooled, `ln_post`-normalised, projected output;
  content embedding = the tower's pooled, projected output with control injected.

Differences: runs on open_clip 3.x batch-first towers from any ViT name or config dict; adds
SRCLIP-V2/DePLSR style fine-grained degradation tokens (`Linear(D, K·D)` of the degradation embedding),
projected patch tokens of the tower, per-block hidden states, and a `preprocess` for [0, 1] tensors.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from torch import nn

from dalpsr.checkpoint_io import read_state_dict as read_checkpoint

logger = logging.get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("resize", "crop")


@dataclass
class DegradationFeatures(BaseOutput):
    """Output of `DegradationEncoder.forward` (one forward serves every consumer).

    Attributes:
        content_embeds: B×D, the frozen tower's pooled, projected output with control injected ("clean content").
        degradation_embeds: B×D, the controller's pooled, projected output.
        degradation_tokens: B×K×D fine-grained degradation tokens.
        content_tokens: B×N×D, the tower's patch tokens after `ln_post`, projected (N = grid cells).
        hidden_states: L tensors B×(1+N)×W, the tower's residual stream after each block (control added).
    """

    content_embeds: torch.Tensor
    degradation_embeds: torch.Tensor
    degradation_tokens: torch.Tensor
    content_tokens: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


def build_open_clip_model(clip_model: str | dict) -> nn.Module:
    """An open_clip CLIP with random weights from a model name ("ViT-B-32") or a config dict.

    The dict has open_clip's model-config layout: `embed_dim`, `vision_cfg`, `text_cfg` and optionally
    `quick_gelu`, `init_logit_scale`, ... `custom_text` is ignored (DA-CLIP's configs set it yet build a plain
    CLIP); a `text_cfg` naming an HF model builds `CustomTextCLIP`.
    """
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    if isinstance(clip_model, str):
        cfg = open_clip.get_model_config(clip_model)
        if cfg is None:
            raise ValueError(
                f"`clip_model` {clip_model!r} is not an open_clip model name; pass a config dict or one of "
                f"{open_clip.list_models()[:20]} ..."
            )
    elif isinstance(clip_model, dict):
        cfg = copy.deepcopy(clip_model)
    else:
        raise TypeError(
            f"`clip_model` must be an open_clip model name or config dict; got {type(clip_model).__name__}."
        )
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"`clip_model` config needs {key!r}; got keys {sorted(cfg)}.")
    cfg.pop("custom_text", None)
    if "hf_model_name" in cfg["text_cfg"]:
        return CustomTextCLIP(**cfg)
    return CLIP(**cfg)


def _check_vit(visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"`clip_model` must have an open_clip ViT image tower (VisionTransformer); got {type(visual).__name__}."
        )
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise ValueError(
            "`clip_model` vision_cfg must have patch_dropout 0: tower and controller must see the same tokens."
        )


class DegradationEncoder(ModelMixin, ConfigMixin):
    """Frozen open_clip CLIP plus a trainable DA-CLIP controller on its ViT image tower.

    Args:
        clip_model: open_clip model name or config dict (random weights; load real ones with
            `from_open_clip` / `from_daclip`).
        num_degradation_tokens: K, number of fine-grained degradation tokens.
        resize_mode: default of `preprocess`: "resize" (CLIP standard: shorter side to the tower size,
            centre crop) or "crop" (centre crop at native resolution, upscaling only images smaller than
            the tower; keeps noise/blur/JPEG statistics intact).
        image_mean: per-channel normalisation mean (default: OpenAI CLIP).
        image_std: per-channel normalisation std (default: OpenAI CLIP).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        clip_model: str | dict = "ViT-B-32",
        num_degradation_tokens: int = 8,
        resize_mode: str = "resize",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_degradation_tokens, int) or num_degradation_tokens < 1:
            raise ValueError(f"`num_degradation_tokens` must be a positive int; got {num_degradation_tokens!r}.")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}; got {resize_mode!r}.")
        self.clip = build_open_clip_model(clip_model)
        visual = self.clip.visual
        _check_vit(visual)
        self.clip.requires_grad_(False)
        self.controller = copy.deepcopy(visual).requires_grad_(True)
        width = visual.transformer.width
        self.zero_modules = nn.ModuleList(nn.Linear(width, width) for _ in visual.transformer.resblocks)
        self.embed_dim = int(visual.output_dim)
        self.token_head = nn.Linear(self.embed_dim, num_degradation_tokens * self.embed_dim)
        self.logit_scale = nn.Parameter(self.clip.logit_scale.detach().clone())
        mean = torch.tensor(image_mean or OPENAI_CLIP_MEAN, dtype=torch.float32)
        std = torch.tensor(image_std or OPENAI_CLIP_STD, dtype=torch.float32)
        if mean.shape != (3,) or std.shape != (3,) or bool((std <= 0).any()):
            raise ValueError(f"`image_mean`/`image_std` must be 3 values (std > 0); got {image_mean}, {image_std}.")
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)
        self._tokenizer = None
        self.reset_controller()

    # ----------------------------------------------------------------------------------------------- set-up
    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the image tower expects."""
        h, w = self.clip.visual.image_size
        return int(h), int(w)

    @property
    def num_layers(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @torch.no_grad()
    def reset_controller(self) -> None:
        """Copy the frozen tower into the controller and zero the zero modules (DA-CLIP `initial_controller`).

        Afterwards `content_embeds` equals plain open_clip `encode_image`.
        """
        self.controller.load_state_dict(self.clip.visual.state_dict())
        for zero in self.zero_modules:
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def freeze_clip(self) -> None:
        """Freeze the open_clip model (both towers); controller, zero modules, token head and logit scale train."""
        self.clip.requires_grad_(False)
        for module in (self.controller, self.zero_modules, self.token_head):
            module.requires_grad_(True)
        self.logit_scale.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the frozen open_clip model."""
        return [p for n, p in self.named_parameters() if not n.startswith("clip.")]

    # ------------------------------------------------------------------------------------------- images
    def preprocess(self, images: torch.Tensor, resize_mode: str | None = None) -> torch.Tensor:
        """Images B×3×H×W (or 3×H×W) in [0, 1] → normalised `pixel_values` B×3×h×w at `image_size`.

        Args:
            images: float RGB in [0, 1], any size.
            resize_mode: "resize" or "crop" (see class docstring); None uses the config's.
        """
        mode = self.config.resize_mode if resize_mode is None else resize_mode
        if mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}; got {mode!r}.")
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"`images` must be a float tensor B×3×H×W in [0, 1]; got {type(images).__name__}.")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"`images` must be a float tensor B×3×H×W in [0, 1]; got {tuple(images.shape)} {images.dtype}."
            )
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1e-6 and hi <= 1 + 1e-6):
            raise ValueError(f"`images` values must lie in [0, 1]; got range [{lo:.4g}, {hi:.4g}].")
        th, tw = self.image_size
        _, _, h, w = images.shape
        x = images.float()
        scale = max(th / h, tw / w)
        if mode == "resize" or scale > 1:
            size = (max(th, round(h * scale)), max(tw, round(w * scale)))
            if size != (h, w):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=scale < 1).clamp(0, 1)
        _, _, h, w = x.shape
        top, left = (h - th) // 2, (w - tw) // 2
        x = x[:, :, top : top + th, left : left + tw]
        mean = self.pixel_mean.to(x.device)
        std = self.pixel_std.to(x.device)
        return ((x - mean) / std).to(self.dtype)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True) -> DegradationFeatures | tuple:
        """Encode preprocessed images (see `preprocess`).

        Args:
            pixel_values: B×3×h×w, normalised, at `image_size`.
            return_dict: return `DegradationFeatures` (else a tuple in its field order).
        """
        expected = (3, *self.image_size)
        if (
            not isinstance(pixel_values, torch.Tensor)
            or pixel_values.ndim != 4
            or tuple(pixel_values.shape[1:]) != expected
        ):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"`pixel_values` must be B×{expected[0]}×{expected[1]}×{expected[2]} (use `preprocess`); got {got}."
            )
        tower, ctrl = self.clip.visual, self.controller
        batch_first = getattr(tower.transformer, "batch_first", True)

        # controller: its own stream is untouched; zero module i reads block i's output
        c = ctrl._embeds(pixel_values)  # B×(1+N)×W
        c = c if batch_first else c.transpose(0, 1)
        controls = []
        for block, zero in zip(ctrl.transformer.resblocks, self.zero_modules):
            c = block(c)
            controls.append(zero(c))
        c = c if batch_first else c.transpose(0, 1)
        degradation_embeds, _ = ctrl._pool(c)
        if ctrl.proj is not None:
            degradation_embeds = degradation_embeds @ ctrl.proj

        # frozen tower: block i receives the control of controller block L-1-i
        x = tower._embeds(pixel_values)
        x = x if batch_first else x.transpose(0, 1)
        hidden_states = []
        for i, block in enumerate(tower.transformer.resblocks):
            x = block(x) + controls[-1 - i]
            hidden_states.append(x if batch_first else x.transpose(0, 1))
        x = x if batch_first else x.transpose(0, 1)
        content_embeds, content_tokens = tower._pool(x)
        if tower.proj is not None:
            content_embeds = content_embeds @ tower.proj
            content_tokens = content_tokens @ tower.proj

        b, d = degradation_embeds.shape
        degradation_tokens = self.token_head(degradation_embeds).view(b, self.config.num_degradation_tokens, d)
        out = DegradationFeatures(
            content_embeds=content_embeds,
            degradation_embeds=degradation_embeds,
            degradation_tokens=degradation_tokens,
            content_tokens=content_tokens,
            hidden_states=tuple(hidden_states),
        )
        return out if return_dict else out.to_tuple()

    def encode_images(self, images: torch.Tensor, resize_mode: str | None = None) -> DegradationFeatures:
        """`forward(preprocess(images))` for B×3×H×W images in [0, 1]."""
        return self(self.preprocess(images, resize_mode).to(self.device))

    # --------------------------------------------------------------------------------------------- text
    @property
    def tokenizer(self):
        """open_clip tokenizer matching the text tower (bundled BPE; no download for plain CLIP text towers)."""
        if self._tokenizer is None:
            import open_clip

            name = self.config.clip_model
            if isinstance(name, str):
                self._tokenizer = open_clip.get_tokenizer(name)
            elif "hf_tokenizer_name" in name["text_cfg"]:
                self._tokenizer = open_clip.tokenizer.HFTokenizer(name["text_cfg"]["hf_tokenizer_name"])
            else:
                self._tokenizer = open_clip.tokenizer.SimpleTokenizer(
                    context_length=name["text_cfg"].get("context_length", 77)
                )
        return self._tokenizer

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """CLIP text embeddings B×D of strings (tokenised here) or token ids."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, torch.Tensor):
            texts = list(texts)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError("`texts` must be a string, a non-empty list of strings, or a token-id tensor.")
            texts = self.tokenizer(texts)
        return self.clip.encode_text(texts.to(self.device), normalize=normalize)

    # ------------------------------------------------------------------------------------------ weights
    def load_open_clip_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a plain open_clip CLIP state dict into the frozen model, then re-copy the controller.

        The positional embedding is resized (open_clip's `resize_pos_embed`) when the grid differs.
        """
        from open_clip.model import resize_pos_embed

        state = dict(state_dict)
        resize_pos_embed(state, self.clip)
        result = self.clip.load_state_dict(state, strict=strict)
        if not strict and (result.missing_keys or result.unexpected_keys):
            logger.warning(f"open_clip weights: missing {result.missing_keys}, unexpected {result.unexpected_keys}.")
        self.reset_controller()

    @classmethod
    def from_open_clip(cls, clip_model: str | dict, pretrained: str | os.PathLike, **kwargs) -> DegradationEncoder:
        """Build the encoder with open_clip weights in the frozen model (controller = copy, zero modules 0).

        Args:
            clip_model: open_clip model name or config dict.
            pretrained: a checkpoint file (.safetensors / .bin / .pt / .pth, optionally `state_dict`-wrapped)
                or an open_clip pretrained tag, resolved through open_clip's cache (needs the hub unless cached).
            kwargs: other `__init__` arguments.
        """
        model = cls(clip_model=clip_model, **kwargs)
        path = str(pretrained)
        if not os.path.isfile(path):
            path = _resolve_open_clip_tag(clip_model, path)
        model.load_open_clip_state_dict(read_state_dict(path))
        return model

    @classmethod
    def from_daclip(
        cls, checkpoint_path: str | os.PathLike, model: str | dict = "ViT-B-32", **kwargs
    ) -> DegradationEncoder:
        """Build the encoder from a DA-CLIP checkpoint (e.g. `daclip_ViT-B-32.pt`) for any open_clip ViT.

        Args:
            checkpoint_path: DA-CLIP checkpoint (keys `clip.*`, `visual_control.*`, `logit_scale`).
            model: the open_clip name or config dict it was trained with ("ViT-B-32" for DA-CLIP's release;
                "daclip_" prefixes are stripped).
            kwargs: other `__init__` arguments. The token head is not in DA-CLIP and stays as initialised.
        """
        if isinstance(model, str) and model.startswith("daclip_"):
            model = model[len("daclip_") :]
        encoder = cls(clip_model=model, **kwargs)
        state = convert_daclip_state_dict(read_state_dict(checkpoint_path))
        encoder.load_converted_state_dict(state, source=str(checkpoint_path))
        return encoder

    def load_converted_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load converted DA-CLIP weights: every key must land; only the token head may be absent."""
        own = self.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise ValueError(
                f"{source} has keys this encoder does not have, e.g. {unexpected[:5]} ({len(unexpected)})."
            )
        bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            raise ValueError(
                f"{source} does not match `clip_model` {self.config.clip_model!r}: shape (got, expected) {bad[:5]}."
            )
        missing = sorted(set(own) - set(state))
        if [k for k in missing if not k.startswith("token_head.")]:
            raise ValueError(f"{source} lacks keys, e.g. {missing[:5]} ({len(missing)}).")
        self.load_state_dict(state, strict=False)
        if missing:
            logger.info(f"{source}: kept initial values for {missing} (not part of DA-CLIP).")


def _resolve_open_clip_tag(clip_model: str | dict, tag: str) -> str:
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    if not isinstance(clip_model, str):
        raise ValueError(f"`pretrained` {tag!r} is not a file; a pretrained tag needs `clip_model` given by name.")
    cfg = get_pretrained_cfg(clip_model, tag)
    if not cfg:
        raise FileNotFoundError(f"`pretrained` {tag!r} is neither a file nor an open_clip tag for {clip_model!r}.")
    try:
        return download_pretrained(cfg)
    except Exception as err:  # hub errors vary by backend; all mean "not available here"
        raise FileNotFoundError(
            f"open_clip weights {clip_model}/{tag} are not in the local cache and could not be downloaded ({err}); "
            "pass the checkpoint file as `pretrained`."
        ) from err


# ------------------------------------------------------------------------------------------- DA-CLIP layout
# Read open_clip / DA-CLIP checkpoints and convert DA-CLIP's layout to `DegradationEncoder`.
#
# DA-CLIP (github.com/Algolzw/daclip-uir, `da-clip/src/open_clip/daclip_model.py`) saves the state dict of
# its `DaCLIP` module:
# - `clip.*`: the whole open_clip CLIP (image and text towers, `clip.logit_scale`);
# - `visual.*`: the same image tower again (DaCLIP registers `clip.visual` a second time as `visual`);
# - `visual_control.*`: the controller, a copy of the image tower whose transformer is wrapped, so its
#   blocks are `visual_control.transformer.transformer.resblocks.N.*` and its zero modules
#   `visual_control.transformer.zero_modules.N.{weight,bias}`; other tower parts (`conv1`, embeddings,
#   `ln_pre`, `ln_post`, `proj`) sit directly under `visual_control.`;
# - `logit_scale`: DaCLIP's own temperature.
# Training checkpoints wrap it as `{"state_dict": ..., "epoch": ...}`, possibly with DDP `module.` prefixes.
_CHECKPOINT_WRAPPERS = ("state_dict", "model", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A DA-CLIP / open_clip state dict from a file; `{"state_dict": ...}` / `{"model": ...}` wrappers and DDP
    `module.` prefixes are removed."""
    return read_checkpoint(path, wrapper_keys=_CHECKPOINT_WRAPPERS)


_CTRL_BLOCK = re.compile(r"^visual_control\.transformer\.transformer\.resblocks\.(\d+)\.(.+)$")
_CTRL_ZERO = re.compile(r"^visual_control\.transformer\.zero_modules\.(\d+)\.(weight|bias)$")


def convert_daclip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DA-CLIP keys → `DegradationEncoder` keys.

    `clip.*` → `clip.*`; controller blocks → `controller.transformer.resblocks.N.*`; zero modules →
    `zero_modules.N.*`; other `visual_control.*` → `controller.*`; `logit_scale` → `logit_scale`.
    The duplicate `visual.*` copy is dropped (used only where `clip.visual.*` is absent).

    Raises:
        ValueError: no DA-CLIP controller keys, or keys outside the layout.
    """
    if not any(k.startswith("visual_control.") for k in state):
        raise ValueError(
            "`state` is not a DA-CLIP checkpoint: no `visual_control.*` keys "
            f"(first keys: {list(state)[:5]}). For plain open_clip weights use `DegradationEncoder.from_open_clip`."
        )
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("clip."):
            out[key] = value
        elif key.startswith("visual."):
            out.setdefault("clip." + key, value)
        elif m := _CTRL_BLOCK.match(key):
            out[f"controller.transformer.resblocks.{m.group(1)}.{m.group(2)}"] = value
        elif m := _CTRL_ZERO.match(key):
            out[f"zero_modules.{m.group(1)}.{m.group(2)}"] = value
        elif key.startswith("visual_control.transformer."):
            unknown.append(key)
        elif key.startswith("visual_control."):
            out["controller." + key[len("visual_control.") :]] = value
        elif key == "logit_scale":
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"`state` has keys outside DA-CLIP's layout, e.g. {unknown[:5]} ({len(unknown)}).")
    return out


def to_daclip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`DegradationEncoder` keys → DA-CLIP keys (the inverse of `convert_daclip_state_dict`, with the
    `visual.*` duplicate); the token head, which DA-CLIP lacks, is left out."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("clip."):
            out[key] = value
            if key.startswith("clip.visual."):
                out[key[len("clip.") :]] = value
        elif key.startswith("controller.transformer.resblocks."):
            out["visual_control.transformer.transformer." + key[len("controller.transformer.") :]] = value
        elif key.startswith("controller."):
            out["visual_control." + key[len("controller.") :]] = value
        elif key.startswith("zero_modules."):
            out["visual_control.transformer." + key] = value
        elif key == "logit_scale":
            out[key] = value
    return out
