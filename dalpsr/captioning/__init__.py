"""MLLM captions for the ControlNet branch, by concern.

- `captioner`: the `Captioner` (a transformers image-text-to-text model) and `load_caption_model`.
- `cache`: `CaptionCache` (JSONL or SQLite) keyed by image content, model and instruction; `load_captions`.
- `budget`: `fit_to_token_budget`, shortening a caption to the text encoder's token budget.
"""

from dalpsr.captioning.budget import CLIP_TOKEN_BUDGET, fit_to_token_budget
from dalpsr.captioning.cache import (
    CaptionCache,
    CaptionRecord,
    CorruptEntry,
    caption_key,
    image_content_sha256,
    load_captions,
)
from dalpsr.captioning.captioner import (
    DEFAULT_CAPTION_MODEL,
    DEFAULT_INSTRUCTION,
    Captioner,
    CaptionModelNotFoundError,
    clean_caption,
    load_caption_model,
)

__all__ = [
    "CLIP_TOKEN_BUDGET",
    "DEFAULT_CAPTION_MODEL",
    "DEFAULT_INSTRUCTION",
    "CaptionCache",
    "CaptionModelNotFoundError",
    "CaptionRecord",
    "Captioner",
    "CorruptEntry",
    "caption_key",
    "clean_caption",
    "fit_to_token_budget",
    "image_content_sha256",
    "load_caption_model",
    "load_captions",
]
