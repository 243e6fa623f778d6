"""Rows of docs/protocols.md's loss tables, each checked against the translation it describes
(so the table cannot say what the code does not do). Rows are named by their first cell."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.translate.anthropic_openai import chat_request_to_messages
from gateway.translate.openai_anthropic import messages_request_to_chat

DOC = (Path(__file__).parents[2] / "docs" / "protocols.md").read_text()
USER: dict[str, Any] = {"role": "user", "content": "hi"}


def _to_chat(**body: Any) -> dict[str, Any]:
    return messages_request_to_chat({"max_tokens": 9, "messages": [USER], **body}, "up")


def _to_messages(**body: Any) -> dict[str, Any]:
    return chat_request_to_messages({"messages": [USER], **body}, "up")


def _system_blocks() -> None:
    blocks = [
        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "b"},
    ]
    assert _to_chat(system=blocks)["messages"][0] == {"role": "system", "content": "a\n\nb"}


def _system_role_refused() -> None:
    with pytest.raises(GatewayError) as refused:
        _to_chat(messages=[USER, {"role": "system", "content": "x"}])
    assert refused.value.status == 400
    assert "must have role user or assistant" in refused.value.message


def _thinking_dropped() -> None:
    out = _to_chat(thinking={"type": "enabled", "budget_tokens": 1024})
    assert "thinking" not in out
    history = [
        USER,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "text", "text": "ok"},
            ],
        },
        USER,
    ]
    assert _to_chat(messages=history)["messages"][1] == {"role": "assistant", "content": "ok"}


def _cache_control_dropped() -> None:
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
    }
    assert "cache_control" not in str(_to_chat(messages=[message]))


def _stop_sequences() -> None:
    assert _to_chat(stop_sequences=["END"])["stop"] == ["END"]


def _metadata_user() -> None:
    assert _to_chat(metadata={"user_id": "u1"})["user"] == "u1"


def _stop_to_stop_sequences() -> None:
    assert _to_messages(stop="END")["stop_sequences"] == ["END"]


def _n_refused() -> None:
    with pytest.raises(GatewayError):
        _to_messages(n=2)


def _system_messages_anywhere() -> None:
    body = _to_messages(
        messages=[{"role": "system", "content": "a"}, USER, {"role": "developer", "content": "b"}]
    )
    assert body["system"] == "a\n\nb"


ROWS: dict[str, Callable[[], None]] = {
    "`system` (string or text blocks)": _system_blocks,
    '`role: "system"` inside `messages`': _system_role_refused,
    "`thinking`, `redacted_thinking` blocks in history": _thinking_dropped,
    "`thinking` parameter": _thinking_dropped,
    "`cache_control` (anywhere)": _cache_control_dropped,
    "`stop_sequences`": _stop_sequences,
    "`metadata.user_id`": _metadata_user,
    "`stop`": _stop_to_stop_sequences,
    "`n` > 1": _n_refused,
    "`system`/`developer` messages (anywhere)": _system_messages_anywhere,
}


@pytest.mark.parametrize("row", list(ROWS))
def test_loss_table_row(row: str) -> None:
    assert f"\n| {row} |" in DOC, f"docs/protocols.md has no row {row!r}"
    ROWS[row]()
