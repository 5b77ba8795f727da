"""Fit a caption into a text encoder's token budget (CLIP: 77 tokens, start and end of text included).

A separate step from captioning because it depends on the pipeline's tokenizer: the pipeline shortens each
caption with `fit_to_token_budget` right before encoding it.
"""

from __future__ import annotations

import re

CLIP_TOKEN_BUDGET = 77

_PHRASE_END_RE = re.compile(r"[.!?;:,](?=\s|$)")
_CONJUNCTION_RE = re.compile(r"\s(?=(?:and|but|while|with|which|where|whereas)\s)", re.IGNORECASE)


def _count_tokens(tokenizer, texts: list[str]) -> list[int]:
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def fit_to_token_budget(text: str, tokenizer, max_tokens: int = CLIP_TOKEN_BUDGET) -> str:
    """Shorten `text` at a phrase boundary so that it encodes to at most `max_tokens` tokens.

    Tokens are counted with `tokenizer` including its special tokens (CLIP: start and end of text, so the
    77-token context leaves 75 for the text). The longest prefix that ends at a sentence or clause
    boundary (`. ! ? ; : ,` or before a conjunction such as "and" or "with") and fits is kept, without
    its trailing comma or conjunction; failing that, the longest fitting prefix of whole words; failing
    that (one overlong word), the first tokens decoded back to text.

    Args:
        text: the caption.
        tokenizer: a transformers tokenizer (the pipeline's text-encoder tokenizer).
        max_tokens: the budget, special tokens included.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"`max_tokens` must be an int; got {type(max_tokens).__name__}.")
    n_special = _count_tokens(tokenizer, [""])[0]
    if max_tokens <= n_special:
        raise ValueError(f"`max_tokens` must exceed the tokenizer's {n_special} special tokens; got {max_tokens}.")
    text = " ".join(text.split())
    if _count_tokens(tokenizer, [text])[0] <= max_tokens:
        return text

    phrase_cuts = {m.end() for m in _PHRASE_END_RE.finditer(text)}
    phrase_cuts |= {m.start() for m in _CONJUNCTION_RE.finditer(text)}
    phrases = sorted({_tidy_prefix(text[:i]) for i in phrase_cuts} - {""}, key=len, reverse=True)
    word_cuts = [m.start() for m in re.finditer(r"\s", text)]
    words = sorted({_tidy_prefix(text[:i]) for i in word_cuts} - {""}, key=len, reverse=True)
    for candidates in (phrases, words):
        if candidates:
            for candidate, count in zip(candidates, _count_tokens(tokenizer, candidates)):
                if count <= max_tokens:
                    return candidate
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    keep = max_tokens - n_special
    while keep > 0:
        candidate = tokenizer.decode(ids[:keep], skip_special_tokens=True).strip()
        if _count_tokens(tokenizer, [candidate])[0] <= max_tokens:
            return candidate
        keep -= 1
    return ""


def _tidy_prefix(prefix: str) -> str:
    prefix = prefix.rstrip()
    while prefix and prefix[-1] in ",;:":
        prefix = prefix[:-1].rstrip()
    return prefix
