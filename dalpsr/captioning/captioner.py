"""The `Captioner`: captions of image content from a multimodal LLM (transformers image-text-to-text).

DaLPSR conditions the ControlNet branch on a caption of the image content written by a multimodal LLM
(LLaVA-1.5 by default, as in SUPIR and DaLPSR). Any `AutoModelForImageTextToText` model id or local folder
works; processors with a chat template get the instruction as a user turn with one image, the others get
the bare instruction. Captions are cleaned of chat-template echoes and role tags (`clean_caption`); fitting
them into the CLIP token budget is `dalpsr.captioning.budget`, caching them `dalpsr.captioning.cache`.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from dalpsr.captioning.cache import CaptionCache, image_content_sha256
from dalpsr.image_io import tensor_to_pil, to_rgb_images
from dalpsr.runtime import resolve_device, resolve_dtype

DEFAULT_CAPTION_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_INSTRUCTION = (
    "Describe the content of this image and its style in detail: the main subjects, their appearance, "
    "the setting, colours, lighting and textures. Do not comment on blur, noise or image quality."
)


# ----------------------------------------------------------------------------------------------------------
# Text hygiene
# ----------------------------------------------------------------------------------------------------------

_TAGGED_ROLE_RE = re.compile(r"<\|?[a-z_]+\|?>\s*(system|user|assistant|model)\b", re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"<\|[^<>|]*\|>|</?(?:image|img|vision)[^<>]*>|\[/?INST\]", re.IGNORECASE)
_ASSISTANT_MARK_RE = re.compile(r"(?:^|\s)(?:assistant|gpt|answer)\s*:|^\s*(?:assistant|model)\s*$", re.I | re.M)
_ROLE_PREFIX_RE = re.compile(r"^(?:\s*(?:user|assistant|system|human|gpt|question|answer)\s*:)+\s*", re.I)


def clean_caption(text: str, instruction: str | None = None) -> str:
    """Strip chat-template echoes, role tags and image placeholders from a decoded MLLM answer.

    Args:
        text: the decoded model output (with or without the echoed prompt).
        instruction: the instruction that was asked; an echo of it is removed.
    """
    text = _TAGGED_ROLE_RE.sub(lambda m: f"\n{m.group(1)}\n", text)  # "<|im_start|>assistant" → role line
    text = _PLACEHOLDER_RE.sub(" ", text)
    marks = list(_ASSISTANT_MARK_RE.finditer(text))
    if marks:
        text = text[marks[-1].end() :]
    elif instruction and instruction.strip() and instruction.strip() in text:
        text = text.rsplit(instruction.strip(), 1)[1]
    text = _ROLE_PREFIX_RE.sub("", text)
    text = " ".join(text.split())
    return text.strip(" \"'`").strip()


# ----------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------


def _looks_like_path(model_id: str) -> bool:
    return (
        os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or model_id.count("/") > 1
        or (os.sep != "/" and os.sep in model_id)
    )


class CaptionModelNotFoundError(OSError):
    """The caption model is neither a local folder nor reachable on (or cached from) the model hub."""


def _missing_model_error(model_id: str, detail: str) -> CaptionModelNotFoundError:
    return CaptionModelNotFoundError(
        f"Caption model {model_id!r} could not be loaded: {detail} "
        f"No model hub is needed when the weights are on disk: download them once where a network is "
        f"available (`huggingface-cli download {model_id} --local-dir ./{model_id.rsplit('/', 1)[-1]}`) "
        f"and pass the folder instead of the id, e.g. `Captioner.from_pretrained('./"
        f"{model_id.rsplit('/', 1)[-1]}')` or `dalpsr caption DIR --model ./{model_id.rsplit('/', 1)[-1]}`."
    )


def _locate_model(
    model_id: str, revision: str | None, cache_dir: str | None, local_files_only: bool | None
) -> tuple[str, bool]:
    """Return (what to load from, whether to stay offline); raise one clear error at once when the model is neither
    a folder nor in the local Hugging Face cache and downloads are not allowed (`local_files_only` not False)."""
    if os.path.isdir(os.path.expanduser(model_id)):
        return os.path.expanduser(model_id), True
    if _looks_like_path(model_id):
        raise _missing_model_error(model_id, f"the folder {os.path.expanduser(model_id)} does not exist.")
    if local_files_only is not False:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True), True
        except LocalEntryNotFoundError:
            raise _missing_model_error(
                model_id,
                "it is not in the local Hugging Face cache, and nothing is downloaded unless asked "
                "(`local_files_only=False`; `dalpsr caption --download`).",
            ) from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise _missing_model_error(model_id, "downloads are allowed but offline mode is on (HF_HUB_OFFLINE).")
    return model_id, False


def load_caption_model(
    model_id: str = DEFAULT_CAPTION_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
):
    """Load `(model, processor)` for an image-text-to-text model id or local folder.

    Args:
        model_id: a Hugging Face model id or a local folder (as written by `save_pretrained`).
        device: where to run; `"auto"` or None (default): CUDA when available, else CPU.
        dtype: `"auto"` (float16 on CUDA, float32 on CPU), `"fp32"`, `"fp16"`, `"bf16"` (or their torch
            names `"float32"`, `"float16"`, `"bfloat16"`), or a torch dtype.
        load_in_4bit: quantise the weights to 4 bit (NF4) with bitsandbytes; CUDA only.
        load_in_8bit: quantise the weights to 8 bit with bitsandbytes; CUDA only.
        trust_remote_code: allow the model repository's own Python code; off unless asked.
        local_files_only: None (default) or True: never contact the hub; a hub id must be in the local cache,
            else this fails at once with one clear error. False: allow the download (and check the hub for a
            newer revision).
        revision: hub revision (branch, tag or commit).
        cache_dir: Hugging Face cache folder.
    """
    if not isinstance(model_id, str) or not model_id:
        raise TypeError(f"`model_id` must be a non-empty str (hub id or local folder); got {model_id!r}.")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if load_in_4bit and load_in_8bit:
        raise ValueError("`load_in_4bit` and `load_in_8bit` are exclusive; pick one.")
    quantization = None
    if load_in_4bit or load_in_8bit:
        flag = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"`{flag}` uses bitsandbytes, which needs a CUDA device; got device {str(device)!r} "
                f"(CUDA available: {torch.cuda.is_available()}). Load without quantisation on this machine."
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(f"`{flag}` needs bitsandbytes: `pip install bitsandbytes`.") from err
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
        )

    from transformers import AutoModelForImageTextToText, AutoProcessor

    source, offline = _locate_model(model_id, revision, cache_dir, local_files_only)
    common = {"trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    if not offline:
        common["revision"] = revision
    try:
        processor = AutoProcessor.from_pretrained(source, **common)
        if quantization is not None:
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=dtype, quantization_config=quantization, device_map={"": device.index or 0}, **common
            )
        else:
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **common).to(device)
    except OSError as err:
        raise _missing_model_error(model_id, str(err).splitlines()[0]) from None
    return model.eval(), processor


class Captioner:
    """Caption images with a multimodal LLM (transformers image-text-to-text model).

    `captioner(images)` returns one cleaned caption per image, batched; captions are looked up in and
    written to `cache` when one is set. `unload()` frees the model (before diffusion runs); when the
    captioner knows how to load it again (`from_pretrained`, `get_dummy_captioner`), the next call
    reloads it.

    As the optional `captioner` component of `DaLPSRPipeline` it is not written by `save_pretrained`
    (diffusers saves only its own, transformers and scheduler classes, and records `[None, None]`); pass
    it again to `from_pretrained(..., captioner=...)`, or keep `captioner.config` (JSON) and rebuild it
    lazily with `Captioner.from_config`.

    Args:
        model: a loaded image-text-to-text model (e.g. `LlavaForConditionalGeneration`).
        processor: its processor (image processor + tokenizer, ideally with a chat template).
        model_id: the name recorded in cache keys; defaults to the model's `name_or_path`.
        loader: a zero-argument callable returning `(model, processor)`, used to (re)load.
        instruction: the question asked for every image.
        max_new_tokens: generation length limit.
        batch_size: images per `generate` call.
        generation_kwargs: extra `generate` arguments (greedy decoding by default).
        cache: a `CaptionCache` or a cache path.
    """

    def __init__(
        self,
        model=None,
        processor=None,
        *,
        model_id: str | None = None,
        loader: Callable[[], tuple[Any, Any]] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        max_new_tokens: int = 100,
        batch_size: int = 4,
        generation_kwargs: dict[str, Any] | None = None,
        cache: CaptionCache | str | os.PathLike | None = None,
    ):
        if (model is None) != (processor is None):
            raise ValueError("`model` and `processor` must be given together.")
        if model is None and loader is None:
            raise ValueError("Pass `model` and `processor`, or a `loader`; got neither.")
        self._check_instruction(instruction)
        self._check_positive("max_new_tokens", max_new_tokens)
        self._check_positive("batch_size", batch_size)
        if model_id is None:
            model_id = getattr(model, "name_or_path", "") or ""
        if not model_id:
            raise ValueError("`model_id` is needed (it is part of every cache key); got none.")
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.loader = loader
        self.instruction = instruction
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generation_kwargs = dict(generation_kwargs or {})
        self.cache = cache if cache is None or isinstance(cache, CaptionCache) else CaptionCache(cache)
        self.load_settings: dict[str, Any] = {}
        if model is not None:
            self._prepare_processor()

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_CAPTION_MODEL,
        *,
        instruction: str = DEFAULT_INSTRUCTION,
        max_new_tokens: int = 100,
        batch_size: int = 4,
        generation_kwargs: dict[str, Any] | None = None,
        cache: CaptionCache | str | os.PathLike | None = None,
        lazy: bool = False,
        **load_kwargs,
    ) -> Captioner:
        """Build a captioner for a hub id or local folder.

        Args:
            model_id: e.g. `"llava-hf/llava-1.5-7b-hf"` (default) or a folder written by `save_pretrained`.
            lazy: load the weights on the first call instead of now.
            load_kwargs: `device`, `dtype`, `load_in_4bit`, `load_in_8bit`, `trust_remote_code`,
                `local_files_only`, `revision`, `cache_dir` (see `load_caption_model`).
        """
        allowed = {"device", "dtype", "load_in_4bit", "load_in_8bit", "trust_remote_code", "local_files_only",
                   "revision", "cache_dir"}  # fmt: skip
        unknown = sorted(set(load_kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"Unknown argument(s) {unknown} for `Captioner.from_pretrained`; allowed: {sorted(allowed)}."
            )

        def loader():
            return load_caption_model(model_id, **load_kwargs)

        captioner = cls(
            model_id=model_id,
            loader=loader,
            instruction=instruction,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            generation_kwargs=generation_kwargs,
            cache=cache,
        )
        captioner.load_settings = {k: v for k, v in load_kwargs.items() if k != "cache_dir"}
        if not lazy:
            captioner.load()
        return captioner

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings; `Captioner.from_config(config)` rebuilds the captioner."""
        settings = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype | torch.device) else v)
                    for k, v in self.load_settings.items()}  # fmt: skip
        return {
            "model_id": self.model_id,
            "instruction": self.instruction,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "generation_kwargs": self.generation_kwargs,
            **settings,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides) -> Captioner:
        """Rebuild a captioner from `config` (lazily unless `lazy=False` is passed)."""
        if not isinstance(config, dict) or "model_id" not in config:
            raise ValueError(f"`config` must be a dict with a 'model_id' entry; got {config!r}.")
        settings = {"lazy": True, **config, **overrides}
        return cls.from_pretrained(settings.pop("model_id"), **settings)

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def device(self) -> torch.device | None:
        return None if self.model is None else next(self.model.parameters()).device

    def load(self) -> None:
        """Load the model now (no-op when loaded)."""
        if self.model is not None:
            return
        if self.loader is None:
            raise RuntimeError(
                f"The caption model {self.model_id!r} was unloaded and this captioner has no `loader` to load "
                "it again; build it with `Captioner.from_pretrained` or pass `loader=`."
            )
        self.model, self.processor = self.loader()
        self._prepare_processor()

    def unload(self) -> None:
        """Drop the model and processor and free their memory (CUDA cache included)."""
        self.model = None
        self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def to(self, device: str | torch.device) -> Captioner:
        """Move the (non-quantised) model to `device`."""
        if self.model is not None:
            self.model.to(resolve_device(device))
        return self

    def _prepare_processor(self) -> None:
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(
                f"`processor` must be a multimodal processor with a `tokenizer`; got {type(self.processor).__name__}."
            )
        if not getattr(self.model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @staticmethod
    def _check_instruction(instruction: str) -> None:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"`instruction` must be a non-empty str; got {instruction!r}.")

    @staticmethod
    def _check_positive(name: str, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; got {value!r}.")

    def build_prompt(self, instruction: str) -> str:
        """The text fed to the processor: the chat template's user turn with one image, or the instruction."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return instruction

    def __call__(
        self,
        images: Image.Image | str | os.PathLike | torch.Tensor | Sequence,
        instruction: str | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Caption `images` (PIL images, paths, float tensors in [0, 1], or a list of them); one str each.

        A caption may be empty when the model answers with nothing but tags or an immediate end token.
        """
        instruction = self.instruction if instruction is None else instruction
        self._check_instruction(instruction)
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_positive("max_new_tokens", max_new_tokens)
        pils = [tensor_to_pil(item.rgb) for item in to_rgb_images(images, "images")]
        captions: list[str | None] = [None] * len(pils)
        hashes = [image_content_sha256(p) for p in pils] if self.cache is not None else []
        if self.cache is not None:
            captions = [self.cache.get(h, self.model_id, instruction) for h in hashes]
        todo = [i for i, c in enumerate(captions) if c is None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for i, text in zip(chunk, self._generate([pils[i] for i in chunk], instruction, max_new_tokens)):
                captions[i] = text
                if self.cache is not None:
                    self.cache.put(hashes[i], self.model_id, instruction, text)
        return [c or "" for c in captions]

    @torch.inference_mode()
    def _generate(self, images: list[Image.Image], instruction: str, max_new_tokens: int) -> list[str]:
        self.load()
        prompt = self.build_prompt(instruction)
        inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        device = self.device
        dtype = self.model.dtype
        inputs = {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()
        }
        settings = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
            **self.generation_kwargs,
        }
        output = self.model.generate(**inputs, **settings)
        prompt_ids = inputs.get("input_ids")
        if (
            prompt_ids is not None
            and output.shape[1] >= prompt_ids.shape[1]
            and torch.equal(output[:, : prompt_ids.shape[1]], prompt_ids)
        ):
            output = output[:, prompt_ids.shape[1] :]
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [clean_caption(t, instruction) for t in texts]
