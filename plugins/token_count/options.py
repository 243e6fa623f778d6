"""The token_count plugin's options, and the tokenizer they choose."""

from __future__ import annotations

import logging
import math
from typing import Literal

import tiktoken
from pydantic import BaseModel, ConfigDict, Field, field_validator

from plugins.token_count.counts import Count, estimate_tokens
from plugins.token_count.families import ESTIMATE
from plugins.token_count.files import _BLOBS

log = logging.getLogger("sluice.plugins.token_count")


class TokenCountOptions(BaseModel):
    """token_count options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_dir: str | None = Field(
        None,
        description="tiktoken cache directory; default $TIKTOKEN_CACHE_DIR, then "
        "$DATA_GYM_CACHE_DIR, then <tmp>/data-gym-cache (where tiktoken looks)",
    )
    default_encoding: str | None = Field(
        "o200k_base",
        description="approximates models without a known tokenizer (exact=False); "
        "null: use the character heuristic for them",
    )
    model_encodings: dict[str, str] = Field(
        default_factory=dict,
        description='model-name prefix -> encoding, or "estimate"; longest prefix wins',
    )
    estimator: Literal["heuristic", "chars"] = "heuristic"
    estimate_chars_per_token: float = Field(4.0, gt=0, description='for estimator "chars"')
    image_tokens: int = Field(765, ge=0, description="per image part (85 if detail low)")
    other_part_tokens: int = Field(256, ge=0, description="per audio/file/other part")
    thread_above_chars: int = Field(
        4096, ge=0, description="count larger prompts in a worker thread"
    )
    load_timeout: float = Field(
        2.0, ge=0, description="longest a request waits for an encoding being loaded"
    )
    preload: list[str] = Field(
        default_factory=list, description="encodings to load at start, in the background"
    )

    @field_validator("default_encoding")
    @classmethod
    def _known_default(cls, value: str | None) -> str | None:
        if value is not None:
            _check_encoding(value)
        return value

    @field_validator("model_encodings")
    @classmethod
    def _known_overrides(cls, value: dict[str, str]) -> dict[str, str]:
        for encoding in value.values():
            if encoding != ESTIMATE:
                _check_encoding(encoding)
        return value

    @field_validator("preload")
    @classmethod
    def _known_preload(cls, value: list[str]) -> list[str]:
        for encoding in value:
            _check_encoding(encoding)
        return value


def _estimator(options: TokenCountOptions) -> Count:
    if options.estimator == "heuristic":
        return estimate_tokens
    per_token = options.estimate_chars_per_token

    def chars(text: str) -> int:
        return math.ceil(len(text) / per_token)

    return chars


def _known_encodings() -> set[str]:
    known = set(_BLOBS)
    try:
        known.update(tiktoken.list_encoding_names())
    except Exception as err:  # a broken tiktoken_ext plugin: only the standard names
        log.debug("tiktoken plugins unusable: %s", err)
    return known


def _check_encoding(name: str) -> None:
    known = _known_encodings()
    if name not in known:
        raise ValueError(f"unknown encoding {name!r} (known: {', '.join(sorted(known))})")
