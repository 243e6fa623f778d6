"""Which tiktoken encoding a model name uses (OpenAI families, `model_encodings` overrides)."""

from __future__ import annotations

from collections.abc import Mapping

ESTIMATE = "estimate"
"""A `model_encodings` value meaning "this model has no tokenizer here: estimate"."""

# ----- model families ------------------------------------------------------------------------

_OPENAI_FAMILIES: dict[str, str] = {
    "gpt-5": "o200k_base",
    "gpt-4.5": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4o": "o200k_base",
    "chatgpt-4o": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4": "o200k_base",
    "gpt-oss": "o200k_base",
    "codex": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5": "cl100k_base",
    "gpt-35": "cl100k_base",  # Azure's spelling
    "text-embedding-3": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
    "davinci-002": "cl100k_base",
    "babbage-002": "cl100k_base",
    "text-davinci-003": "p50k_base",
    "text-davinci-002": "p50k_base",
    "code-davinci-002": "p50k_base",
}
"""Prefix -> encoding; a prefix matches a whole name or one followed by - . : @ or _."""

# fmt: off
_OTHER_FAMILIES = (
    "llama", "meta-llama", "codellama", "mistral", "mixtral", "codestral", "ministral",
    "magistral", "devstral", "pixtral", "qwen", "qwq", "gemma", "gemini", "phi", "deepseek",
    "claude", "command", "granite", "falcon", "olmo", "glm", "internlm", "baichuan",
    "nemotron", "smollm", "starcoder", "yi-",
)
# fmt: on
"""Prefixes of model families with tokenizers of their own (none of them in tiktoken)."""

_SEPARATORS = frozenset("-.:@_")


def _base_name(model: str) -> str:
    name = model.strip().lower().rsplit("/", 1)[-1]
    return name[3:] if name.startswith("ft:") else name


def _lookup(model: str, overrides: Mapping[str, str]) -> tuple[bool, str | None]:
    """(known, encoding): whether `model` matched an override or a family, and its encoding."""
    full, base = model.strip().lower(), _base_name(model)
    for name in (full, base):
        best = max((p for p in overrides if name.startswith(p.lower())), key=len, default=None)
        if best is not None:
            value = overrides[best]
            return True, None if value == ESTIMATE else value
    best = max(
        (
            p
            for p in _OPENAI_FAMILIES
            if base == p or (base.startswith(p) and base[len(p)] in _SEPARATORS)
        ),
        key=len,
        default=None,
    )
    if best is not None:
        return True, _OPENAI_FAMILIES[best]
    if base.startswith(_OTHER_FAMILIES):
        return True, None
    return False, None


def encoding_for_model(model: str, overrides: Mapping[str, str] | None = None) -> str | None:
    """The tiktoken encoding of `model`'s own tokenizer, or None if it has none here.

    `overrides` maps name prefixes to encodings (or "estimate"); the longest prefix wins and
    is checked before the built-in families. Provider prefixes ("openai/gpt-4o") and
    fine-tune prefixes ("ft:gpt-4o-mini:...") are ignored for the families.
    """
    return _lookup(model, overrides or {})[1]
