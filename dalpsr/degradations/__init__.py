"""Degradation synthesis (Real-ESRGAN second-order pipeline and blind-SR presets) with labels and prompt text."""

from __future__ import annotations

from dalpsr._lazy import lazy_getattr

# public name → defining module; imported on first use so the `dalpsr` command starts fast
_EXPORTS = {
    "CANDIDATE_PHRASES": "dalpsr.degradations.vocabulary",
    "DegradationConfig": "dalpsr.degradations.config",
    "DegradationParams": "dalpsr.degradations.pipeline",
    "DegradationResult": "dalpsr.degradations.pipeline",
    "DegradedImage": "dalpsr.degradations.pipeline",
    "FinalConfig": "dalpsr.degradations.config",
    "KernelConfig": "dalpsr.degradations.config",
    "LABEL_SHAPE": "dalpsr.degradations.vocabulary",
    "StageConfig": "dalpsr.degradations.config",
    "TYPES": "dalpsr.degradations.vocabulary",
    "TYPE_NAMES": "dalpsr.degradations.vocabulary",
    "degrade": "dalpsr.degradations.pipeline",
    "degrade_image": "dalpsr.degradations.pipeline",
    "label_values": "dalpsr.degradations.pipeline",
    "labels_to_text": "dalpsr.degradations.vocabulary",
    "preset": "dalpsr.degradations.config",
    "text_to_labels": "dalpsr.degradations.vocabulary",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
