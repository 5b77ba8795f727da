"""`SpandrelRestorer`: any single-image SR network spandrel detects (RRDBNet / Real-ESRGAN, SRVGGNetCompact, SwinIR,
HAT, …) as a diffusers `ModelMixin` with the inference API of `DATRestorer`.

spandrel (github.com/chaiNNer-org/spandrel, MIT) identifies an architecture and its hyperparameters from a state
dict alone and builds its own implementation of the network. The wrapper records what spandrel found (the
architecture id, the network class exported by `spandrel.architectures.<id>`, its hyperparameters) in
`config.json`, so `from_pretrained` rebuilds the network from the config, loads the safetensors weights strictly,
and then asks spandrel to detect the stored state dict again: a folder whose weights spandrel reads as a different
architecture or different hyperparameters is refused. Only modules under `spandrel.architectures` are ever
imported from a config.

Unlike `DATRestorer`, no degradation features are used (`needs_features` is False); `features` / `encoder` are
accepted and ignored so the pipeline's two-stage path calls both kinds the same way.
"""

from __future__ import annotations

import importlib
import json
import logging
import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from dalpsr.models.dat import tiled_forward

logger = logging.getLogger(__name__)

TILING_MODES = ("supported", "discouraged", "internal")


def _json_safe(value):
    """Tuples as lists (what config.json gives back), recursively."""
    if isinstance(value, tuple | list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _exported_name(architecture: str, net_type: type) -> str:
    """The name under which `spandrel.architectures.<architecture>` exports `net_type`."""
    module = importlib.import_module(f"spandrel.architectures.{architecture}")
    for name, value in vars(module).items():
        if value is net_type and not name.startswith("_"):
            return name
    raise ValueError(f"spandrel.architectures.{architecture} does not export its network class {net_type.__name__}.")


def _network_class(architecture: str, model_class: str) -> type[nn.Module]:
    """The network class `model_class` exported by `spandrel.architectures.<architecture>`."""
    if not architecture.isidentifier() or not model_class.isidentifier():
        raise ValueError(
            f"`architecture` and `model_class` must be identifiers; got {architecture!r}, {model_class!r}."
        )
    try:
        module = importlib.import_module(f"spandrel.architectures.{architecture}")
    except ImportError as err:
        raise ValueError(
            f"`architecture` {architecture!r} is not a spandrel architecture (spandrel.architectures has no such "
            f"module); it may need a newer spandrel. ({err})"
        ) from err
    cls = getattr(module, model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            f"`model_class` {model_class!r} is not a network class of spandrel.architectures.{architecture}."
        )
    return cls


class SpandrelRestorer(ModelMixin, ConfigMixin):
    """A spandrel-built SR network with `DATRestorer`'s inference API (`super_resolve`, `scale`,
    `needs_features`).

    Build one with `from_state_dict` / `from_descriptor`; `save_pretrained` / `from_pretrained` round-trip it.

    Args:
        architecture: spandrel's architecture id (e.g. "ESRGAN", "Compact", "SwinIR").
        model_class: the name `spandrel.architectures.<architecture>` exports the network class under (e.g.
            "ESRGAN" for its RRDBNet).
        hyperparameters: its constructor arguments, as spandrel detected them.
        scale: the SR factor.
        in_channels / out_channels: image channels in and out (3 for RGB).
        size_minimum / size_multiple_of / size_square: spandrel's size requirements of an input (inputs that do
            not meet them are reflect-padded and the output cropped).
        supports_half / supports_bfloat16: whether fp16 / bf16 inference is safe for this architecture.
        tiling: spandrel's tiling advice: "supported", "discouraged" (works, may cost quality) or "internal" (the
            network tiles itself; external tiling is not applied).
    """

    @register_to_config
    def __init__(
        self,
        architecture: str,
        model_class: str,
        hyperparameters: dict,
        scale: int,
        in_channels: int = 3,
        out_channels: int = 3,
        size_minimum: int = 0,
        size_multiple_of: int = 1,
        size_square: bool = False,
        supports_half: bool = True,
        supports_bfloat16: bool = True,
        tiling: str = "supported",
    ) -> None:
        super().__init__()
        if not isinstance(hyperparameters, dict):
            raise TypeError(f"`hyperparameters` must be a dict; got {type(hyperparameters).__name__}.")
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"`scale` must be a positive int; got {scale!r}.")
        if tiling not in TILING_MODES:
            raise ValueError(f"`tiling` must be one of {TILING_MODES}; got {tiling!r}.")
        if size_multiple_of < 1 or size_minimum < 0:
            raise ValueError(
                f"`size_multiple_of` must be >= 1 and `size_minimum` >= 0; got {size_multiple_of}, {size_minimum}."
            )
        self.net = _network_class(architecture, model_class)(**hyperparameters)

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def from_descriptor(cls, descriptor) -> SpandrelRestorer:
        """Wrap a spandrel `ImageModelDescriptor` (its network and weights are used as they are)."""
        from spandrel import ImageModelDescriptor, ModelTiling

        if not isinstance(descriptor, ImageModelDescriptor):
            raise TypeError(f"`descriptor` must be a spandrel ImageModelDescriptor; got {type(descriptor).__name__}.")
        if descriptor.purpose not in ("SR", "Restoration"):
            raise ValueError(
                f"`descriptor` is a {descriptor.purpose} model ({descriptor.architecture.id}); only SR and "
                "restoration models can be a restorer."
            )
        net = descriptor.model
        params = getattr(net, "hyperparameters", None)
        if not isinstance(params, dict):
            raise ValueError(
                f"spandrel's {descriptor.architecture.id} network does not record its hyperparameters, so it cannot "
                "be saved and rebuilt from a config."
            )
        params = _json_safe(params)
        try:
            json.dumps(params)
        except TypeError as err:
            raise ValueError(
                f"The hyperparameters of spandrel's {descriptor.architecture.id} are not JSON values ({err})."
            ) from err
        req = descriptor.size_requirements
        tiling = {
            ModelTiling.SUPPORTED: "supported",
            ModelTiling.DISCOURAGED: "discouraged",
            ModelTiling.INTERNAL: "internal",
        }[descriptor.tiling]
        model = cls(
            architecture=str(descriptor.architecture.id),
            model_class=_exported_name(str(descriptor.architecture.id), type(net)),
            hyperparameters=params,
            scale=int(descriptor.scale),
            in_channels=int(descriptor.input_channels),
            out_channels=int(descriptor.output_channels),
            size_minimum=int(req.minimum),
            size_multiple_of=int(req.multiple_of),
            size_square=bool(req.square),
            supports_half=bool(descriptor.supports_half),
            supports_bfloat16=bool(descriptor.supports_bfloat16),
            tiling=tiling,
        )
        model.net.load_state_dict(net.state_dict(), strict=True)
        return model.eval()

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor]) -> SpandrelRestorer:
        """Detect the architecture of a state dict with spandrel and wrap the network it builds.

        Raises:
            ValueError: spandrel does not recognise the state dict, or it is not an SR / restoration model.
        """
        from spandrel import ModelLoader, UnsupportedModelError

        try:
            descriptor = ModelLoader().load_from_state_dict(state_dict)
        except UnsupportedModelError as err:
            raise ValueError(
                f"spandrel recognises no architecture in this state dict ({len(state_dict)} tensors, e.g. "
                f"{list(state_dict)[:3]})."
            ) from err
        return cls.from_descriptor(descriptor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SpandrelRestorer:
        """`ModelMixin.from_pretrained`, then spandrel detects the stored state dict again and must find the
        architecture and hyperparameters the config names."""
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model.check_with_spandrel()
        return model

    def check_with_spandrel(self) -> None:
        """Raise ValueError unless spandrel reads this network's weights as the configured architecture."""
        from spandrel import ModelLoader, UnsupportedModelError

        state = {k: v.detach().to("cpu", torch.float32) for k, v in self.net.state_dict().items()}
        try:
            found = ModelLoader().load_from_state_dict(state)
        except UnsupportedModelError as err:
            raise ValueError(
                f"spandrel does not recognise the stored weights of this {self.config.architecture}."
            ) from err
        params = _json_safe(getattr(found.model, "hyperparameters", {}))
        cfg = self.config
        if found.architecture.id != cfg.architecture or params != _json_safe(cfg.hyperparameters):
            raise ValueError(
                f"The stored weights are a {found.architecture.id} with {params}, but config.json names a "
                f"{cfg.architecture} with {cfg.hyperparameters}."
            )
        if found.scale != cfg.scale:
            raise ValueError(
                f"The stored weights are a ×{found.scale} network, but config.json says `scale`={cfg.scale}."
            )

    # ------------------------------------------------------------------------------------- inference
    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def needs_features(self) -> bool:
        """Always False: the network uses no degradation features."""
        return False

    @property
    def tile_multiple(self) -> int:
        """Inputs are padded to multiples of this edge (spandrel's size requirement)."""
        return self.config.size_multiple_of

    @property
    def tile_square(self) -> bool:
        """Whether the network needs square inputs (spandrel's size requirement): tiles are then square."""
        return bool(self.config.size_square)

    def _pad_to_requirements(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Reflect/replicate-pad (right and bottom) to the network's size requirements; returns the original size."""
        h, w = x.shape[-2:]
        cfg = self.config
        th, tw = max(h, cfg.size_minimum), max(w, cfg.size_minimum)
        if cfg.size_square:
            th = tw = max(th, tw)
        m = cfg.size_multiple_of
        th, tw = -(-th // m) * m, -(-tw // m) * m
        if (th, tw) != (h, w):
            mode = "reflect" if th - h < h and tw - w < w else "replicate"
            x = F.pad(x, (0, tw - w, 0, th - h), mode=mode)
        return x, h, w

    def forward(self, lr: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C', H*scale, W*scale), unclamped; pads to the size requirements."""
        x, h, w = self._pad_to_requirements(lr)
        out = self.net(x)
        return out[..., : h * self.scale, : w * self.scale]

    @torch.no_grad()
    def super_resolve(
        self,
        lr: Tensor,
        features=None,
        encoder=None,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int = 16,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Inference in overlapping tiles (linear blending, `dalpsr.models.dat.tiled_forward`), optionally under
        fp16/bf16 autocast.

        Args:
            lr: (B, C, H, W) in [0, 1], on the model's device.
            features, encoder: ignored (no fusion); accepted so `DATRestorer` and this class are called alike.
            tile_size: input tile edge or (height, width); None runs whole images (ignored when the network tiles
                internally).
            tile_overlap: input pixels over which neighbouring tiles are blended.
            dtype: `torch.float16` / `torch.bfloat16` autocast, None for the input dtype; a dtype the
                architecture does not support runs in the input dtype instead, with a warning.

        Returns:
            (B, C', H*scale, W*scale) in `lr`'s dtype, unclamped.
        """
        if not isinstance(lr, Tensor) or lr.ndim != 4 or lr.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`lr` must be a (B, {self.config.in_channels}, H, W) tensor; got {getattr(lr, 'shape', type(lr))}."
            )
        unsupported = (dtype is torch.float16 and not self.config.supports_half) or (
            dtype is torch.bfloat16 and not self.config.supports_bfloat16
        )
        if unsupported:
            logger.warning(f"{self.config.architecture} does not support {dtype}; running in {lr.dtype}.")
            dtype = None
        if self.config.tiling == "internal":
            tile_size = None
        return tiled_forward(self, lr, self.scale, tile_size, tile_overlap, dtype)


__all__ = ["SpandrelRestorer"]
