"""SeeSR-compatible image cross-attention on the stock diffusers UNet and ControlNet.

SeeSR (Wu et al., "SeeSR: Towards Semantics-Aware Real-World Image Super-Resolution", CVPR 2024,
github.com/cswry/SeeSR) gives every cross-attention block of the SD2 UNet (down, mid, up) and of its LR
ControlNet a `ModuleList` named `image_attentions`: one `Transformer2DModel` per text transformer, with the
same heads, head dim, layers, projection and norm groups but `cross_attention_dim=512`. Each runs right
after its text transformer `attentions[i]` and attends to RAM/DAPE image embeddings (B × 145 × 512); in the
mid block the order is text → image → resnet.

SeeSR forks diffusers' UNet, block and ControlNet files for this. Here the stock classes run unchanged:

- `add_image_attention` adds the `image_attentions` lists to the stock blocks (`CrossAttnDownBlock2D`,
  `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`), each transformer built from its text sibling's config
  with only `cross_attention_dim` replaced, so checkpoint keys are SeeSR's
  (`down_blocks.1.image_attentions.0.transformer_blocks.0.attn2.to_k.weight`, ...);
- a PyTorch forward hook (`register_forward_hook(..., with_kwargs=True)`) on each text transformer applies the
  paired image transformer to its output, so the stock block forwards (resnets, ControlNet residuals, gradient
  checkpointing, FreeU) keep their code and order;
- `SeeSRUNet2DConditionModel` / `SeeSRControlNetModel` subclass the stock models: config flags
  `use_image_cross_attention` and `image_cross_attention_dim`, a forward taking `image_encoder_hidden_states=`,
  and a strict `from_pretrained` (a missing, unexpected or mis-shaped key raises instead of the stock warning).

Differences from SeeSR: the text `encoder_attention_mask` is not given to the image attention (it masks text
tokens, not image tokens; SeeSR passes it, and it is None in all of SeeSR's calls); the embeddings are
validated (shape, batch) instead of failing inside attention.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

# `ModelMixin` must be a name in this module: diffusers' pipeline loader finds the load method of a saved custom
# component by looking up the base classes (ModelMixin, ...) in the module that defines it.
from diffusers import ControlNetModel, ModelMixin, Transformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn
from torch import nn

IMAGE_CROSS_ATTENTION_DIM = 512
SUPPORTED_BLOCKS = (CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D)


class ImageStates:
    """The image embeddings of the forward call in progress (None outside a forward); shared by a model's hooks."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class ImageAttentionHook:
    """Forward hook on `block.attentions[index]` that applies `block.image_attentions[index]` to its output.

    The image transformer is looked up on the block at call time, so replacing or wrapping it (e.g. by PEFT)
    takes effect.
    """

    def __init__(self, block: nn.Module, index: int, states: ImageStates):
        self.block = block
        self.index = index
        self.states = states

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        embeds = self.states.value
        if embeds is None:
            raise ValueError(
                "Image cross-attention ran without `image_encoder_hidden_states`; call the model (not one of its "
                "blocks) with `image_encoder_hidden_states=` B×N×D image embeddings."
            )
        as_tuple = isinstance(output, tuple)
        hidden = output[0] if as_tuple else output.sample
        hidden = self.block.image_attentions[self.index](
            hidden,
            encoder_hidden_states=embeds,
            cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
            attention_mask=kwargs.get("attention_mask"),
            return_dict=False,
        )[0]
        return (hidden, *output[1:]) if as_tuple else Transformer2DModelOutput(sample=hidden)


def cross_attention_blocks(model: ModelMixin) -> list[nn.Module]:
    """The blocks of a UNet or ControlNet that have text cross-attention (down, mid, up order).

    Raises:
        ValueError: a cross-attention block type SeeSR's image attention does not cover (e.g. simple or dual
            cross-attention).
    """
    candidates = [*model.down_blocks, getattr(model, "mid_block", None), *getattr(model, "up_blocks", [])]
    blocks = []
    for block in candidates:
        if block is None or not getattr(block, "has_cross_attention", False):
            continue
        if not isinstance(block, SUPPORTED_BLOCKS) or not all(
            isinstance(a, Transformer2DModel) for a in block.attentions
        ):
            raise ValueError(
                f"Image cross-attention supports {[b.__name__ for b in SUPPORTED_BLOCKS]} with Transformer2DModel "
                f"attentions; the model has a {type(block).__name__}."
            )
        blocks.append(block)
    return blocks


def add_image_attention(model: ModelMixin, image_cross_attention_dim: int = IMAGE_CROSS_ATTENTION_DIM) -> ImageStates:
    """Give every cross-attention block of `model` an `image_attentions` list run after its text attentions.

    Args:
        model: a diffusers `UNet2DConditionModel` or `ControlNetModel` (or subclass) without image attention.
        image_cross_attention_dim: width of the image embeddings (512 for RAM/DAPE).

    Returns:
        The `ImageStates` the hooks read the embeddings from; set `.value` for the duration of a forward.
    """
    if isinstance(image_cross_attention_dim, bool) or not isinstance(image_cross_attention_dim, int):
        raise TypeError(f"`image_cross_attention_dim` must be an int; got {image_cross_attention_dim!r}.")
    if image_cross_attention_dim <= 0:
        raise ValueError(f"`image_cross_attention_dim` must be positive; got {image_cross_attention_dim}.")
    blocks = cross_attention_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no cross-attention block to add image attention to.")
    states = ImageStates()
    for block in blocks:
        if hasattr(block, "image_attentions"):
            raise ValueError(f"{type(block).__name__} already has `image_attentions`.")
        image_attentions = nn.ModuleList()
        for attn in block.attentions:
            config = {k: v for k, v in attn.config.items() if not k.startswith("_")}
            config["cross_attention_dim"] = image_cross_attention_dim
            image_attention = Transformer2DModel(**config)
            ref, new = next(attn.parameters()), next(image_attention.parameters())
            if (new.device, new.dtype) != (ref.device, ref.dtype):
                # nn.Module.to: ModelMixin.to warns about fp32-kept modules, of which Transformer2DModel has none.
                nn.Module.to(image_attention, device=ref.device, dtype=ref.dtype)
            image_attentions.append(image_attention)
        block.image_attentions = image_attentions
        for index, attn in enumerate(block.attentions):
            attn.register_forward_hook(ImageAttentionHook(block, index, states), with_kwargs=True)
    return states


def _with_image_attention_params(init, base_init):
    # diffusers' ConfigMixin reads the config keys from the `__init__` signature; declare the base class's
    # parameters followed by the two image-attention ones (keyword-only) so `from_config` passes all of them.
    base = inspect.signature(base_init)
    extra = [
        inspect.Parameter("use_image_cross_attention", inspect.Parameter.KEYWORD_ONLY, default=False),
        inspect.Parameter(
            "image_cross_attention_dim", inspect.Parameter.KEYWORD_ONLY, default=IMAGE_CROSS_ATTENTION_DIM
        ),
    ]
    init.__signature__ = base.replace(parameters=[*base.parameters.values(), *extra])
    return init


def _check_loading_info(info: dict, cls_name: str, source) -> None:
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        details = "; ".join(f"{k} ({len(v)}): {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items() if v)
        raise ValueError(
            f"{cls_name} weights at {str(source)!r} do not match the architecture in its config.json: {details}. "
            f"For SeeSR folders, check that config.json has `use_image_cross_attention: true` and the weights "
            f"are SeeSR's `unet/` or `controlnet/`."
        )


class _ImageAttentionMixin:
    """Shared parts of the two model subclasses (validation of the embeddings, strict loading)."""

    def _image_states_for(self, sample: torch.Tensor, image_encoder_hidden_states: torch.Tensor | None):
        enabled = self.config.use_image_cross_attention
        if image_encoder_hidden_states is None:
            if enabled:
                raise ValueError(
                    f"`image_encoder_hidden_states` is required: this {type(self).__name__} has image "
                    f"cross-attention; pass B×N×{self.config.image_cross_attention_dim} image embeddings "
                    f"(e.g. from `RAMImageEncoder`)."
                )
            return None
        if not enabled:
            raise ValueError(
                f"`image_encoder_hidden_states` was given but this {type(self).__name__} has no image "
                f"cross-attention (use_image_cross_attention=False)."
            )
        if not isinstance(image_encoder_hidden_states, torch.Tensor):
            raise TypeError(
                f"`image_encoder_hidden_states` must be a tensor; got {type(image_encoder_hidden_states).__name__}."
            )
        dim = self.config.image_cross_attention_dim
        shape = tuple(image_encoder_hidden_states.shape)
        if len(shape) != 3 or shape[-1] != dim or shape[0] != sample.shape[0]:
            raise ValueError(
                f"`image_encoder_hidden_states` must have shape (batch={sample.shape[0]}, tokens, {dim}); got {shape}."
            )
        return image_encoder_hidden_states

    def _forward_with_images(self, forward, sample, image_encoder_hidden_states, *args, **kwargs):
        embeds = self._image_states_for(sample, image_encoder_hidden_states)
        states = self._image_states
        if states is None:
            return forward(sample, *args, **kwargs)
        states.value = embeds
        try:
            return forward(sample, *args, **kwargs)
        finally:
            states.value = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load like diffusers' `from_pretrained`, but a missing, unexpected or mis-shaped weight raises ValueError."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        where = pretrained_model_name_or_path
        if kwargs.get("subfolder"):
            where = os.path.join(str(pretrained_model_name_or_path), kwargs["subfolder"])
        _check_loading_info(info, cls.__name__, where)
        return (model, info) if want_info else model


class SeeSRUNet2DConditionModel(_ImageAttentionMixin, UNet2DConditionModel):
    r"""The stock `UNet2DConditionModel` with optional SeeSR image cross-attention.

    Takes every `UNet2DConditionModel` argument plus:
        use_image_cross_attention: add `image_attentions` after every text cross-attention (down, mid, up).
        image_cross_attention_dim: width of the image embeddings (512 for RAM/DAPE).

    `forward` takes the stock arguments plus `image_encoder_hidden_states` (B × N × image_cross_attention_dim),
    required when image attention is on.
    """

    @register_to_config
    def __init__(self, *args, use_image_cross_attention: bool = False, image_cross_attention_dim: int = 512, **kwargs):
        super().__init__(*args, **kwargs)
        self._image_states = add_image_attention(self, image_cross_attention_dim) if use_image_cross_attention else None

    _with_image_attention_params(__init__.__wrapped__, UNet2DConditionModel.__init__)
    __init__.__signature__ = __init__.__wrapped__.__signature__

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args,
        image_encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ):
        """The stock UNet forward; `image_encoder_hidden_states` feed the image cross-attention."""
        return self._forward_with_images(
            super().forward, sample, image_encoder_hidden_states, timestep, encoder_hidden_states, *args, **kwargs
        )


class SeeSRControlNetModel(_ImageAttentionMixin, ControlNetModel):
    r"""The stock `ControlNetModel` with optional SeeSR image cross-attention (down and mid blocks).

    Takes every `ControlNetModel` argument plus `use_image_cross_attention` and `image_cross_attention_dim`
    (see `SeeSRUNet2DConditionModel`); `forward` takes the stock arguments plus `image_encoder_hidden_states`.
    """

    @register_to_config
    def __init__(self, *args, use_image_cross_attention: bool = False, image_cross_attention_dim: int = 512, **kwargs):
        super().__init__(*args, **kwargs)
        self._image_states = add_image_attention(self, image_cross_attention_dim) if use_image_cross_attention else None

    _with_image_attention_params(__init__.__wrapped__, ControlNetModel.__init__)
    __init__.__signature__ = __init__.__wrapped__.__signature__

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *args,
        image_encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ):
        """The stock ControlNet forward; `image_encoder_hidden_states` feed the image cross-attention."""
        return self._forward_with_images(
            super().forward,
            sample,
            image_encoder_hidden_states,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            *args,
            **kwargs,
        )

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
        use_image_cross_attention: bool | None = None,
    ) -> SeeSRControlNetModel:
        """A ControlNet copied from `unet` (as diffusers' `from_unet`), including its image attention.

        Args:
            use_image_cross_attention: None follows the UNet; True on a UNet without image attention adds fresh
                image transformers (SeeSR's training start).
        """
        unet_has = bool(getattr(unet.config, "use_image_cross_attention", False))
        use = unet_has if use_image_cross_attention is None else bool(use_image_cross_attention)
        dim = getattr(unet.config, "image_cross_attention_dim", IMAGE_CROSS_ATTENTION_DIM)
        controlnet = super().from_unet(
            unet,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            load_weights_from_unet=False,
            conditioning_channels=conditioning_channels,
        )
        if use:
            controlnet._image_states = add_image_attention(controlnet, dim)
            controlnet.register_to_config(use_image_cross_attention=True, image_cross_attention_dim=dim)
        if load_weights_from_unet:
            parts = ["conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding"]
            for name in parts:
                if getattr(controlnet, name, None) is not None:
                    getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
            for name in ("down_blocks", "mid_block"):
                source = getattr(unet, name).state_dict()
                if use and not unet_has:  # fresh image attention: copy only what the UNet has
                    missing = getattr(controlnet, name).load_state_dict(source, strict=False).missing_keys
                    if any("image_attentions" not in k for k in missing):
                        raise ValueError(f"UNet `{name}` does not match the ControlNet: missing {missing}.")
                elif unet_has and not use:
                    getattr(controlnet, name).load_state_dict(
                        {k: v for k, v in source.items() if "image_attentions" not in k}
                    )
                else:
                    getattr(controlnet, name).load_state_dict(source)
        return controlnet
