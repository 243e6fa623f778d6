"""The native Responses lane: a Responses client on a Responses upstream, over loopback.

Request bodies and headers reach the upstream's ``/responses`` as the client sent them
(model replaced, the gateway's key instead of the client's); the upstream's events reach
the client as their original bytes. The transcript in tests/golden/responses is OpenAI's
framing, with a reasoning item (encrypted content, summary deltas), a function call, text
with multi-byte characters and ``response.completed`` with usage. The upstream keeps the
state: follow-ups, GET and DELETE go to the deployment that answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from pydantic import BaseModel

from gateway.context import Outcome
from gateway.testing.fake_upstream import Exchange, FakeUpstream, Script, json_script, rechunk
from gateway.testing.harness import RunningGateway, run_gateway
from plugins.access_log import AccessLog
from plugins.content_filter import ContentFilter
from plugins.latency import LATENCY, LatencyMeter
from plugins.token_count import TOKENS, TokenCounter
from tests.integration._support import BOUND, make_probe
from tests.integration.provider_fakes import cut_at, inside, named_events, root_url

GOLDEN = Path(__file__).parent.parent / "golden" / "responses"
FULL = (GOLDEN / "reasoning_tools_text.sse").read_bytes()
UNARY: dict[str, Any] = orjson.loads((GOLDEN / "reasoning_tools_text.json").read_bytes())
RID = UNARY["id"]
KEY = "sk-proj-gateway-key-0123456789abcdefABCDEF"
RESPONSES = "/v1/responses"
REGISTRY: dict[str, type[Any]] = {
    "token_count": TokenCounter,
    "latency": LatencyMeter,
    "access_log": AccessLog,
    "content_filter": ContentFilter,
}
TEXT = "Il fait beau à Paris ☀️ (21 °C)."


def _config(
    fake: FakeUpstream, plugins: Sequence[dict[str, Any]] = (), **extra: Any
) -> dict[str, Any]:
    upstream = {"kind": "openai", "base_url": fake.base_url, "api_key": KEY}
    return {
        "upstreams": {
            "gpt": {**upstream, "responses_api": "native", **extra.pop("upstream", {})},
            **extra.pop("upstreams", {}),
        },
        "routes": extra.pop(
            "routes",
            [{"model": "m", "upstream": "gpt", "upstream_model": "gpt-5-up", "retries": 0}],
        ),
        "plugins": list(plugins),
        **extra,
    }


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "input": "Weather in Paris?", "stream": True, **extra}


def _counted(tmp_path: Path) -> list[dict[str, Any]]:
    """token_count with the character heuristic (no tokenizer files needed)."""
    return [
        {"name": "token_count", "options": {"cache_dir": str(tmp_path), "default_encoding": None}}
    ]


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, bytes]:
    async with asyncio.timeout(BOUND), http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.read()


@asynccontextmanager
async def _sdk(gw: RunningGateway, key: str = "sk-client") -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=BOUND)
    try:
        yield client
    finally:
        await client.close()


def _with_id(transcript: bytes, response_id: str) -> bytes:
    return transcript.replace(RID.encode(), response_id.encode())


# ----- byte identity ---------------------------------------------------------------------------

SPLITS: dict[str, Any] = {
    "whole": lambda data: [data],
    "every-7-bytes": lambda data: rechunk(data, [7] * (len(data) // 7 + 1)),
    "awkward": lambda data: cut_at(data, *_awkward(data)),
}


def _awkward(data: bytes) -> list[int]:
    """Offsets inside UTF-8 sequences, inside JSON, between an event's two LFs, in a name."""
    cuts = {
        data.index(b"\n\n") + 1,
        inside(data, "event: response.output_text", 9),
        inside(data, '"delta', 3),
        inside(data, "encrypted_content", 4),
    }
    for needle in ("é", "☀", "à", "°"):
        cuts.add(inside(data, needle, 1))
    return sorted(cuts)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("plugins", ["none", "observers"])
async def test_recorded_transcript_reaches_the_client_byte_for_byte(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path, plugins: str, split: str
) -> None:
    fake.queue(Script(SPLITS[split](FULL)))
    chain = [*_counted(tmp_path), {"name": "latency"}, {"name": "access_log"}]
    config = _config(fake, chain if plugins == "observers" else [])
    async with run_gateway(config, registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + RESPONSES, _body())
    assert status == 200
    assert raw == FULL
    (exchange,) = fake.exchanges
    assert exchange.path == "/v1/responses"


# ----- requests --------------------------------------------------------------------------------


async def test_request_passes_through_with_model_and_key_replaced(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([FULL]))
    body = _body(
        input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]},
            {"type": "item_reference", "id": "msg_123"},
        ],
        reasoning={"effort": "high", "summary": "auto"},
        include=["reasoning.encrypted_content"],
        tools=[{"type": "web_search"}, {"type": "mcp", "server_label": "x", "server_url": "u"}],
        future_field={"nested": [1, 2]},
        truncation="auto",
    )
    async with run_gateway(_config(fake)) as gw:
        status, _ = await _post(
            http,
            gw.url + RESPONSES,
            body,
            Authorization="Bearer sk-client-key",
            **{"OpenAI-Beta": "responses=v1", "OpenAI-Organization": "org-1"},
        )
    assert status == 200
    (exchange,) = fake.exchanges
    assert exchange.body == {**body, "model": "gpt-5-up"}
    headers = {k.lower(): v for k, v in exchange.headers.items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["openai-beta"] == "responses=v1"
    assert headers["openai-organization"] == "org-1"


async def test_translated_when_the_upstream_does_not_speak_responses(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """A compatible server (not api.openai.com) without `responses_api` is translated."""
    config = _config(fake, upstream={"responses_api": None})
    async with run_gateway(config) as gw:
        status, _ = await _post(http, gw.url + RESPONSES, _body())
    assert status == 200
    assert fake.exchanges[0].path == "/v1/chat/completions"


# ----- the official SDK ------------------------------------------------------------------------


async def test_sdk_create_stream(fake: FakeUpstream) -> None:
    fake.queue(Script(rechunk(FULL, [5, 300, 1] * 200)))
    probe, log = make_probe()
    async with run_gateway(_config(fake, [{"name": "probe"}]), registry={"probe": probe}) as gw:
        async with _sdk(gw) as client:
            stream = await client.responses.create(model="m", input="hi", stream=True)
            events = [event async for event in stream]
        (ctx,) = await log.wait_ends(1)
    assert [e.type for e in events] == [name for name, _ in named_events(FULL)]
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == TEXT
    assert done.response.output[0].type == "reasoning"
    assert ctx.outcome is Outcome.COMPLETED
    assert ctx.usage.source == "upstream"
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (57, 91)
    assert ctx.usage.cached_tokens == 32
    assert ctx.response_model == "gpt-5-2025-08-07"


async def test_sdk_stream_helper_and_final_response(fake: FakeUpstream) -> None:
    fake.queue(Script([FULL]))
    async with (
        run_gateway(_config(fake)) as gw,
        _sdk(gw) as client,
        client.responses.stream(model="m", input="hi") as stream,
    ):
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(texts) == TEXT
    assert final.id == RID
    assert final.output_text == TEXT
    call = final.output[1]
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert final.usage is not None
    assert final.usage.total_tokens == 148


class Weather(BaseModel):
    city: str
    celsius: int


async def test_sdk_parse_non_streaming(fake: FakeUpstream) -> None:
    answer = '{"city":"Paris","celsius":21}'
    body = {
        **UNARY,
        "output": [
            {
                "id": "msg_1",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "annotations": [], "logprobs": [], "text": answer}
                ],
            }
        ],
    }
    fake.queue(json_script(body))
    probe, log = make_probe()
    async with run_gateway(_config(fake, [{"name": "probe"}]), registry={"probe": probe}) as gw:
        async with _sdk(gw) as client:
            parsed = await client.responses.parse(model="m", input="hi", text_format=Weather)
        (ctx,) = await log.wait_ends(1)
    assert parsed.output_parsed == Weather(city="Paris", celsius=21)
    sent = fake.exchanges[0].body
    assert sent["model"] == "gpt-5-up"
    assert sent["text"]["format"]["type"] == "json_schema"
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (57, 91)


# ----- errors ----------------------------------------------------------------------------------

RATE_LIMITED = {
    "error": {
        "message": "Rate limit reached for gpt-5.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


async def test_error_before_headers_keeps_the_status(fake: FakeUpstream) -> None:
    fake.queue(json_script(RATE_LIMITED, status=429))
    async with run_gateway(_config(fake)) as gw, _sdk(gw) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.responses.create(model="m", input="hi", stream=True)
    assert caught.value.status_code == 429
    assert "Rate limit reached" in caught.value.message


def _events_until(name: str, transcript: bytes = FULL) -> bytes:
    """The transcript's events up to and including the first `name` one."""
    end = transcript.index(b"\n\n", transcript.index(f"event: {name}\n".encode())) + 2
    return transcript[:end]


async def test_response_failed_after_headers_is_the_last_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    head = _events_until("response.reasoning_summary_text.delta")
    failed = {
        "type": "response.failed",
        "sequence_number": 5,
        "response": {
            **UNARY,
            "status": "failed",
            "error": {"code": "server_error", "message": "The model crashed."},
        },
    }
    tail = b"event: response.failed\ndata: " + orjson.dumps(failed) + b"\n\n"
    fake.queue(Script([head, tail]))
    probe, log = make_probe()
    config = _config(fake, [{"name": "probe"}])
    async with run_gateway(config, registry={"probe": probe}) as gw:
        status, raw = await _post(http, gw.url + RESPONSES, _body())
        async with _sdk(gw) as client:
            fake.queue(Script([head, tail]))
            async with client.responses.stream(model="m", input="hi") as stream:
                kinds = [event.type async for event in stream]
        (ctx, _) = await log.wait_ends(2)
    assert status == 200
    assert raw == head + tail  # the upstream's own event ends the stream
    assert ctx.outcome is Outcome.UPSTREAM_ERROR
    assert ctx.error is not None
    assert ctx.error.message == "The model crashed."
    assert kinds[-1] == "response.failed"


async def test_stream_cut_without_terminal_ends_with_response_failed(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    head = _events_until("response.output_text.delta")
    fake.queue(Script([head]))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + RESPONSES, _body())
    assert status == 200
    assert raw.startswith(head)
    name, last = named_events(raw)[-1]
    assert name == last["type"] == "response.failed"
    assert last["response"]["id"] == RID
    assert last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "server_error"
    assert last["sequence_number"] == named_events(head)[-1][1]["sequence_number"] + 1


async def test_error_event_before_created_is_an_error_event(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    event = {
        "type": "error",
        "sequence_number": 0,
        "code": "rate_limit_exceeded",
        "message": "Slow down.",
        "param": None,
    }
    fake.queue(Script([b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"]))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + RESPONSES, _body())
    # Nothing reached the client before the error: it is a real status.
    assert status == 429
    assert orjson.loads(raw)["error"]["message"] == "Slow down."


# ----- previous_response_id, GET, DELETE -------------------------------------------------------


class Holder:
    """A fake's responder: streams with its own response ids, answers GET/DELETE of them."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.created = 0

    def __call__(self, exchange: Exchange) -> Script:
        if exchange.path.startswith(f"{RESPONSES}/"):
            rid = exchange.path.rsplit("/", 1)[-1]
            if not rid.startswith(f"resp_{self.tag}"):
                missing = {"message": "No such response.", "type": "invalid_request_error"}
                return json_script({"error": missing}, 404)
            return json_script({**UNARY, "id": rid, "holder": self.tag})
        self.created += 1
        return Script([_with_id(FULL, f"resp_{self.tag}_{self.created}")])


async def test_previous_response_id_reaches_the_deployment_that_holds_it(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeUpstream(responder=Holder("a")) as a, FakeUpstream(responder=Holder("b")) as b:
        upstream = {"kind": "openai", "api_key": KEY, "responses_api": "native"}
        config = {
            "upstreams": {
                "a": {**upstream, "base_url": a.base_url},
                "b": {**upstream, "base_url": b.base_url},
            },
            "routes": [
                {"model": "m", "deployments": [{"upstream": "a"}, {"upstream": "b"}], "retries": 0}
            ],
        }
        async with run_gateway(config) as gw:
            firsts = []
            for _ in range(2):  # round robin: one on each
                _, raw = await _post(http, gw.url + RESPONSES, _body())
                firsts.append(named_events(raw)[0][1]["response"]["id"])
            assert {rid.split("_")[1] for rid in firsts} == {"a", "b"}
            for _ in range(3):
                for rid in firsts:
                    status, raw = await _post(
                        http, gw.url + RESPONSES, _body(previous_response_id=rid, input="more")
                    )
                    assert status == 200
            # GET and DELETE go to the holder too
            async with http.get(gw.url + f"{RESPONSES}/{firsts[1]}") as resp:
                got = await resp.json()
            async with http.delete(gw.url + f"{RESPONSES}/{firsts[0]}") as resp:
                deleted_status = resp.status
            async with http.get(gw.url + f"{RESPONSES}/{firsts[0]}") as resp:
                after_delete = resp.status
    for fake, tag in ((a, "a"), (b, "b")):
        follow_ups = [
            e for e in fake.exchanges if e.path == RESPONSES and e.body.get("previous_response_id")
        ]
        assert len(follow_ups) == 3
        assert all(e.body["previous_response_id"].startswith(f"resp_{tag}") for e in follow_ups)
    assert got["holder"] == firsts[1].split("_")[1]
    assert got["id"] == firsts[1]
    assert deleted_status == 200
    assert after_delete == 404
    deletes = [e for e in (*a.exchanges, *b.exchanges) if e.path == f"{RESPONSES}/{firsts[0]}"]
    assert len(deletes) == 1


async def test_store_false_leaves_nothing_to_read(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([FULL]))
    async with run_gateway(_config(fake)) as gw:
        await _post(http, gw.url + RESPONSES, _body(store=False))
        async with http.get(gw.url + f"{RESPONSES}/{RID}") as resp:
            status = resp.status
    assert status == 404
    assert [e.path for e in fake.exchanges] == [RESPONSES]  # not asked: the gateway never knew


# ----- plugins ---------------------------------------------------------------------------------


async def test_token_count_and_access_log_read_the_native_lane(
    fake: FakeUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.queue(Script(rechunk(FULL, [11] * 1000)))
    probe, log = make_probe()
    chain = [
        *_counted(tmp_path),
        {"name": "latency"},
        {"name": "access_log", "options": {"log_prompts": True, "log_completions": True}},
        {"name": "probe"},
    ]
    async with run_gateway(_config(fake, chain), registry={**REGISTRY, "probe": probe}) as gw:
        async with _sdk(gw) as client:
            stream = await client.responses.create(
                model="m", input="Weather in Paris?", instructions="Be brief.", stream=True
            )
            _ = [event async for event in stream]
        (ctx,) = await log.wait_ends(1)
    tokens = ctx.require(TOKENS)
    assert tokens.prompt_tokens > 0
    # the text (12 by the heuristic), the reasoning summary (25 in two deltas) and the
    # function call (name and arguments) were counted
    assert tokens.completion_tokens >= 12 + 25 + 2 + 5 - 2
    assert tokens.diff_completion == tokens.completion_tokens - 91
    # latency: the first token is the first text delta (reasoning before it is not)
    names = [name for name, _ in named_events(FULL)]
    first_text = names.index("response.output_text.delta")
    stats = ctx.require(LATENCY)
    assert stats.ttft is not None
    assert stats.events == len(names) - 1 - first_text  # the chain never sees the terminal
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"request"' in x]
    assert line["completion"] == [TEXT]
    assert line["prompt"] == ["Be brief.", "Weather in Paris?"]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (57, 91)
    assert (line["endpoint"], line["upstream"], line["outcome"]) == (
        "responses",
        "gpt",
        "completed",
    )


async def test_content_filter_refuses_the_native_lane(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    chain = [{"name": "content_filter", "options": {"completion_action": "redact"}}]
    async with run_gateway(_config(fake, chain), registry=REGISTRY) as gw:
        status, raw = await _post(http, gw.url + RESPONSES, _body())
    assert status == 501
    assert "responses_api: translate" in orjson.loads(raw)["error"]["message"]
    assert fake.exchanges == []


# ----- Azure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({"use_v1_api": True}, "/openai/v1/responses"),
        ({"api_version": "2025-04-01-preview"}, "/openai/responses"),
    ],
)
async def test_azure_native_url_and_deployment(
    fake: FakeUpstream, http: aiohttp.ClientSession, settings: dict[str, Any], path: str
) -> None:
    fake.queue(Script([FULL]))
    azure = {
        "kind": "azure",
        "endpoint": root_url(fake),
        "api_key": KEY,
        "deployments": {"gpt-5-up": "my-gpt5"},
        **settings,
    }
    config = {
        "upstreams": {"az": azure},
        "routes": [{"model": "m", "upstream": "az", "upstream_model": "gpt-5-up", "retries": 0}],
    }
    async with run_gateway(config) as gw:
        status, raw = await _post(http, gw.url + RESPONSES, _body())
    assert (status, raw) == (200, FULL)
    (exchange,) = fake.exchanges
    assert exchange.path == path
    assert exchange.body["model"] == "my-gpt5"
    assert {k.lower(): v for k, v in exchange.headers.items()}["api-key"] == KEY


async def test_previous_response_id_the_gateway_does_not_know_is_passed_on(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Made elsewhere (straight at OpenAI, or before a restart): the upstream judges it."""
    fake.queue(Script([FULL]))
    async with run_gateway(_config(fake)) as gw:
        status, raw = await _post(http, gw.url + RESPONSES, _body(previous_response_id="resp_x"))
    assert (status, raw) == (200, FULL)
    assert fake.exchanges[0].body["previous_response_id"] == "resp_x"


async def test_previous_response_held_elsewhere_is_refused_before_any_upstream(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(Script([FULL]))
    other = {"kind": "openai", "base_url": fake.base_url, "responses_api": "native"}
    chat = {"kind": "openai", "base_url": fake.base_url}  # translated
    routes = [
        {"model": "m", "upstream": "gpt", "retries": 0},
        {"model": "n", "upstream": "other", "retries": 0},
        {"model": "t", "upstream": "chat", "retries": 0},
    ]
    config = _config(fake, upstreams={"other": other, "chat": chat}, routes=routes)
    async with run_gateway(config) as gw:
        await _post(http, gw.url + RESPONSES, _body())
        native = await _post(http, gw.url + RESPONSES, _body(model="n", previous_response_id=RID))
        translated = await _post(
            http, gw.url + RESPONSES, _body(model="t", previous_response_id=RID)
        )
    for status, raw in (native, translated):
        assert status == 400
        error = orjson.loads(raw)["error"]
        assert (error["code"], error["param"]) == (
            "previous_response_elsewhere",
            "previous_response_id",
        )
    assert len(fake.exchanges) == 1
