"""The Responses store: bounded by count, bytes and retention; scoped per team; Redis shared."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.config import ConfigError, parse_config
from gateway.protocols.responses.config import ResponsesConfig
from gateway.protocols.responses.objects import Turn
from gateway.protocols.responses.store import MemoryStore, RedisStore, StoredResponse
from gateway.testing.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(scope: str = "ml", text: str = "hi") -> StoredResponse:
    turn = Turn(model="m", request={"input": text})
    output = [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    ]
    response = turn.response("completed", output)  # type: ignore[arg-type]
    return StoredResponse(scope, response, [{"type": "message", "role": "user", "content": text}])


async def test_a_record_is_only_found_by_its_scope() -> None:
    store = MemoryStore(ResponsesConfig())
    record = _record("ml")
    store.put(record)
    assert await store.get("ops", record.id) is None
    assert not await store.delete("ops", record.id)
    found = await store.get("ml", record.id)
    assert found is not None
    assert found.conversation()[-1]["type"] == "message"
    assert await store.delete("ml", record.id)
    assert await store.get("ml", record.id) is None


async def test_records_expire_after_the_retention() -> None:
    clock = Clock()
    store = MemoryStore(ResponsesConfig(retention_seconds=60), clock)
    record = _record()
    store.put(record)
    clock.now += 59
    assert await store.get("ml", record.id) is not None
    clock.now += 2
    assert await store.get("ml", record.id) is None
    assert len(store) == 0
    assert store.bytes == 0


async def test_the_oldest_go_first_past_max_entries() -> None:
    store = MemoryStore(ResponsesConfig(max_entries=2))
    records = [_record() for _ in range(3)]
    for record in records:
        store.put(record)
    assert len(store) == 2
    assert await store.get("ml", records[0].id) is None
    assert await store.get("ml", records[2].id) is not None


async def test_bytes_stay_under_max_bytes() -> None:
    size = len(_record(text="x" * 500).encode())
    store = MemoryStore(ResponsesConfig(max_bytes=max(1024, size * 3)))
    for _ in range(20):
        store.put(_record(text="x" * 500))
    assert store.bytes <= max(1024, size * 3)
    assert len(store) == max(1024, size * 3) // size


async def test_an_entry_over_max_entry_bytes_is_not_stored() -> None:
    store = MemoryStore(ResponsesConfig(max_entry_bytes=1024))
    big = _record(text="y" * 2000)
    store.put(big)
    assert await store.get("ml", big.id) is None


def test_an_unknown_key_in_the_block_is_named() -> None:
    config = {"upstreams": {"d": {"kind": "demo"}}, "routes": [{"model": "m", "upstream": "d"}]}
    with pytest.raises(ConfigError, match=r"responses\.retention"):
        parse_config({**config, "responses": {"retention": 5}}, {})
    assert parse_config(config, {}).responses.store == "memory"


def test_redis_store_needs_a_url() -> None:
    with pytest.raises(ValueError, match="redis_url"):
        ResponsesConfig(store="redis")


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


async def test_redis_store_is_shared_between_replicas_and_expires(redis: RedisServer) -> None:
    config = ResponsesConfig(store="redis", redis_url=redis.url, retention_seconds=30)
    one, two = RedisStore(config), RedisStore(config)
    try:
        record = _record("ml")
        one.put(record)
        assert await one.get("ml", record.id) is not None  # waits for its own pending write
        found = await two.get("ml", record.id)
        assert found is not None
        assert found.response == record.response
        assert await two.get("ops", record.id) is None
        ttl = await two.redis.pttl(config.key_prefix + record.id)
        assert 0 < ttl <= 30_000
        assert await two.delete("ml", record.id)
        assert await one.get("ml", record.id) is None
    finally:
        await one.close()
        await two.close()
