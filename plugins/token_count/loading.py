"""Loading tiktoken encodings offline, in background threads, one store per cache directory.

An encoding file is only ever read from a local path after its SHA-256 matched tiktoken's,
and the `tiktoken.Encoding` is built here from those verified bytes and `SPECS` (the rest of
what tiktoken's own constructors pass: the split pattern and the special tokens). tiktoken's
loader (which may download, and caches through the process environment) is not used for
OpenAI's encodings; the process environment is never touched.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import importlib
import logging
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import tiktoken
import tiktoken.registry

from plugins.token_count import files
from plugins.token_count.files import (
    _BLOBS,
    _OFFLINE_EQUIVALENTS,
    _ONLINE_PLUGIN,
    _file_state,
    _offline_plugin_encodings,
    _write_atomic,
    bundled_encoding,
)

log = logging.getLogger("sluice.plugins.token_count")


@dataclass(frozen=True, slots=True)
class EncodingSpec:
    """What tiktoken's constructor for one encoding passes besides the ranks."""

    pat_str: str
    special_tokens: Mapping[str, int]
    explicit_n_vocab: int | None = None


_O200K_PAT = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
_CL100K_PAT = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"
    r"|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
)
_R50K_PAT = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"
_O200K_SPECIALS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}
_HARMONY_NAMED = {
    "<|startoftext|>": 199998,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
_HARMONY_SPECIALS = (
    _O200K_SPECIALS
    | {f"<|reserved_{i}|>": i for i in range(200000, 201088) if i not in _HARMONY_NAMED.values()}
    | _HARMONY_NAMED
)
_R50K_SPECIALS = {"<|endoftext|>": 50256}

SPECS: Mapping[str, EncodingSpec] = MappingProxyType(
    {
        "o200k_base": EncodingSpec(_O200K_PAT, MappingProxyType(_O200K_SPECIALS)),
        "o200k_harmony": EncodingSpec(_O200K_PAT, MappingProxyType(_HARMONY_SPECIALS)),
        "cl100k_base": EncodingSpec(
            _CL100K_PAT,
            MappingProxyType(
                {
                    "<|endoftext|>": 100257,
                    "<|fim_prefix|>": 100258,
                    "<|fim_middle|>": 100259,
                    "<|fim_suffix|>": 100260,
                    "<|endofprompt|>": 100276,
                }
            ),
        ),
        "p50k_base": EncodingSpec(_R50K_PAT, MappingProxyType(_R50K_SPECIALS), 50281),
        "p50k_edit": EncodingSpec(
            _R50K_PAT,
            MappingProxyType(
                _R50K_SPECIALS
                | {"<|fim_prefix|>": 50281, "<|fim_middle|>": 50282, "<|fim_suffix|>": 50283}
            ),
        ),
        "r50k_base": EncodingSpec(_R50K_PAT, MappingProxyType(_R50K_SPECIALS), 50257),
    }
)
"""Per encoding of `files._BLOBS`: tiktoken_ext/openai_public.py's pattern and special tokens
(a test checks this table against tiktoken's constructors)."""


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """The mergeable ranks of a .tiktoken file: one "<base64 token> <rank>" per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_encoding(name: str, data: bytes) -> tiktoken.Encoding:
    """`name`'s encoding from its file's verified bytes (no I/O, no network)."""
    spec = SPECS[name]
    return tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=parse_ranks(data),
        special_tokens=dict(spec.special_tokens),
        explicit_n_vocab=spec.explicit_n_vocab,
    )


@dataclass(frozen=True, slots=True)
class _Loaded:
    encoding: tiktoken.Encoding | None
    where: str


def _verified(path: Path, sha256: str) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def _offline_package_file(name: str, alias: str) -> tuple[bytes, Path] | None:
    """The file of `name` an offline tiktoken_ext package providing `alias` ships next to
    its module (``data/<name>.tiktoken``), if its hash is tiktoken's."""
    namespace = importlib.import_module("tiktoken_ext")
    for module in pkgutil.iter_modules(namespace.__path__, "tiktoken_ext."):
        if module.name == _ONLINE_PLUGIN:
            continue
        with contextlib.suppress(Exception):  # a broken third-party plugin: skip it
            loaded = importlib.import_module(module.name)
            if alias in loaded.ENCODING_CONSTRUCTORS and loaded.__file__:
                path = Path(loaded.__file__).parent / "data" / f"{name}.tiktoken"
                data = _verified(path, _BLOBS[name].sha256)
                if data is not None:
                    return data, path
    return None


def _load_encoding(name: str, cache_dir: Path | None) -> _Loaded:
    """Load `name` without any network access, or say why not. Runs in a worker thread."""
    ready = tiktoken.registry.ENCODINGS.get(name)
    if ready is not None:
        return _Loaded(ready, "already loaded in this process")
    blob = _BLOBS.get(name)
    if blob is not None:
        if cache_dir is not None:
            path = cache_dir / blob.cache_name
            data = _verified(path, blob.sha256)
            if data is not None:
                return _Loaded(build_encoding(name, data), str(path))
            reason = f"{path} is {_file_state(path, blob.sha256)}"
        else:
            reason = "tiktoken caching is disabled (TIKTOKEN_CACHE_DIR is empty)"
        bundled = bundled_encoding(name)
        if bundled is not None:
            return _load_bundled(name, bundled, cache_dir)
        alias = _OFFLINE_EQUIVALENTS.get(name)
        if alias is not None and alias in _offline_plugin_encodings():
            found = _offline_package_file(name, alias)
            if found is not None:
                return _Loaded(build_encoding(name, found[0]), f"tiktoken_ext {alias}: {found[1]}")
            return _Loaded(tiktoken.get_encoding(alias), f"tiktoken_ext {alias}")
        return _Loaded(None, reason)
    if name in _offline_plugin_encodings():
        return _Loaded(tiktoken.get_encoding(name), "tiktoken_ext plugin")
    return _Loaded(None, "tiktoken would download it; not loaded offline")


def _load_bundled(name: str, data: bytes, cache_dir: Path | None) -> _Loaded:
    """Load `name` from the packaged file (verified bytes), and write it into `cache_dir` in
    tiktoken's layout when that is writable (so the next start finds it cached)."""
    where = f"the {files.BUNDLED_PACKAGE} package's file"
    if cache_dir is None:
        where += " (no cache directory)"
    else:
        path = cache_dir / _BLOBS[name].cache_name
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, data)
            where += f", copied to {path}"
        except OSError as err:
            where += f" (cache directory not writable: {err})"
    return _Loaded(build_encoding(name, data), where)


class EncodingStore:
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


class EncodingRegistry:
    """The encoding stores of a process, one per cache directory, so every plugin instance
    (and every reload) using a directory shares one load of each encoding. The plugin class
    holds one (`TokenCounter.encodings`); tests may build their own."""

    def __init__(self, store: Callable[[Path | None], EncodingStore] = EncodingStore) -> None:
        self._make = store
        self._lock = threading.Lock()
        self._stores: dict[Path | None, EncodingStore] = {}

    def store(self, cache_dir: Path | None) -> EncodingStore:
        """The store of `cache_dir`, made the first time it is asked for."""
        with self._lock:
            found = self._stores.get(cache_dir)
            if found is None:
                found = self._stores[cache_dir] = self._make(cache_dir)
            return found

    def estimator_in_use(self) -> bool:
        """True once a request was counted by the heuristic for lack of an encoding."""
        with self._lock:
            return any(store.fallbacks for store in self._stores.values())
