"""The native Responses lane's pure parts: who speaks it, pointer records, the observer."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.config import ConfigError, parse_config
from gateway.context import Endpoint, RequestContext
from gateway.protocols import RESPONSES
from gateway.protocols.responses.events import NativeResponsesObserver
from gateway.protocols.responses.store import StoredResponse
from gateway.protocols.responses.types import Response
from gateway.runtime import build_upstream
from gateway.sse import SSEEvent


def _upstream(**settings: Any) -> Any:
    config = parse_config(
        {"upstreams": {"u": settings}, "routes": [{"model": "m", "upstream": "u"}]}, {}
    )
    return build_upstream("u", config.upstreams["u"])


@pytest.mark.parametrize(
    ("settings", "native"),
    [
        ({"kind": "openai", "base_url": "https://api.openai.com/v1"}, True),
        ({"kind": "openai", "base_url": "http://127.0.0.1:8000/v1"}, False),
        ({"kind": "openai", "base_url": "https://api.openai.com.evil.example/v1"}, False),
        ({"kind": "openai", "base_url": "http://vllm:8000/v1", "responses_api": "native"}, True),
        (
            {
                "kind": "openai",
                "base_url": "https://api.openai.com/v1",
                "responses_api": "translate",
            },
            False,
        ),
        ({"kind": "azure", "endpoint": "https://r.openai.azure.com"}, False),  # 2024-10-21
        ({"kind": "azure", "endpoint": "https://r.openai.azure.com", "use_v1_api": True}, True),
        (
            {
                "kind": "azure",
                "endpoint": "https://r.openai.azure.com",
                "api_version": "2025-04-01-preview",
            },
            True,
        ),
        ({"kind": "anthropic", "base_url": "https://api.anthropic.com"}, False),
        ({"kind": "demo"}, False),
    ],
)
def test_default_capability_per_kind_and_base_url(settings: dict[str, Any], native: bool) -> None:
    assert (_upstream(**settings).native(RESPONSES) is not None) is native


def test_azure_native_needs_a_surface_with_the_responses_api() -> None:
    with pytest.raises(ConfigError) as info:
        _upstream(kind="azure", endpoint="https://r.openai.azure.com", responses_api="native")
    assert "upstreams.u" in str(info.value)
    assert "use_v1_api" in str(info.value)


def test_responses_api_rejects_other_values() -> None:
    with pytest.raises(ConfigError) as info:
        _upstream(kind="openai", base_url="http://h/v1", responses_api="yes")
    assert "responses_api" in str(info.value)


def test_pointer_records_round_trip() -> None:
    pointer: Response = {"id": "resp_1", "object": "response"}  # type: ignore[typeddict-item]
    record = StoredResponse("team-a", pointer, [], upstream="gpt-east")
    decoded = StoredResponse.decode(record.encode())
    assert decoded == record
    plain = StoredResponse("team-a", pointer, [])
    assert b"upstream" not in plain.encode()
    assert StoredResponse.decode(plain.encode()) == plain


def _event(kind: str, **payload: Any) -> SSEEvent:
    return SSEEvent(orjson.dumps({"type": kind, **payload}), event=kind)


def test_observer_reads_lifecycle_events_only() -> None:
    seen: list[str] = []
    observer = NativeResponsesObserver(on_created=seen.append)
    ctx = RequestContext("req_1", Endpoint.CHAT)
    created = _event("response.created", response={"id": "resp_9", "model": "gpt-5"})
    delta = SSEEvent(b"not json: never parsed", event="response.output_text.delta")
    usage = {"input_tokens": 5, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 2}}
    done = _event("response.completed", response={"id": "resp_9", "usage": usage})
    batch = observer.classify(ctx, [created, delta, done, delta])
    assert batch.events == [created, delta]
    assert batch.terminal is done
    assert batch.error is None
    assert seen == ["resp_9"]
    observer.finish(ctx)
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (5, 7)
    assert ctx.usage.cached_tokens == 2
    assert ctx.response_model == "gpt-5"


def test_observer_reports_errors_and_shapes_its_own() -> None:
    observer = NativeResponsesObserver()
    ctx = RequestContext("req_1", Endpoint.CHAT)
    error = _event("error", code="rate_limit_exceeded", message="Slow down.", sequence_number=0)
    batch = observer.classify(ctx, [error])
    assert batch.error is not None
    assert batch.error.status == 429
    assert observer.error_event(batch.error) is error  # the upstream's own bytes
    # The gateway's own error before response.created: an `error` event.
    cut = NativeResponsesObserver()
    cut.classify(ctx, [_event("response.in_progress", sequence_number=3)])
    own = orjson.loads(cut.error_event(batch.error).data_bytes or b"")
    assert own["type"] == "error"
    assert own["sequence_number"] == 4
