"""Model classes, each `ModelMixin` + `ConfigMixin` so `save_pretrained` / `from_pretrained` round-trip them."""

from dalpsr.models.cdsr import CDSRNet
from dalpsr.models.clip_sr import CLIPSR
from dalpsr.models.dat import DAT
from dalpsr.models.degradation_encoder import DegradationEncoder, DegradationFeatures
from dalpsr.models.fusion import DATRestorer
from dalpsr.models.prompt_decoder import DegradationPrediction, RestorationPromptDecoder
from dalpsr.models.restorer import SpandrelRestorer

__all__ = [
    "CDSRNet",
    "CLIPSR",
    "DAT",
    "DATRestorer",
    "DegradationEncoder",
    "DegradationFeatures",
    "DegradationPrediction",
    "RestorationPromptDecoder",
    "SpandrelRestorer",
]
