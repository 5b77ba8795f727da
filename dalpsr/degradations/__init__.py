"""Degradation synthesis (Real-ESRGAN second-order pipeline and blind-SR presets) with labels and prompt text."""

from dalpsr.degradations.config import DegradationConfig, FinalConfig, KernelConfig, StageConfig, preset
from dalpsr.degradations.pipeline import (
    DegradationParams,
    DegradationResult,
    DegradedImage,
    degrade,
    degrade_image,
    label_values,
)
from dalpsr.degradations.vocabulary import (
    CANDIDATE_PHRASES,
    LABEL_SHAPE,
    TYPE_NAMES,
    TYPES,
    labels_to_text,
    text_to_labels,
)

__all__ = [
    "CANDIDATE_PHRASES",
    "DegradationConfig",
    "DegradationParams",
    "DegradationResult",
    "DegradedImage",
    "FinalConfig",
    "KernelConfig",
    "LABEL_SHAPE",
    "StageConfig",
    "TYPES",
    "TYPE_NAMES",
    "degrade",
    "degrade_image",
    "label_values",
    "labels_to_text",
    "preset",
    "text_to_labels",
]
