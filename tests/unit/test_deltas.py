"""Views of streamed text: the byte-level fast view agrees with the parsed one."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.context import Endpoint, RequestContext
from gateway.deltas import event_texts, finish_reasons, text_delta, text_event, with_texts
from gateway.sse import _UNSET, SSEDecoder, SSEEvent
from gateway.testing.fake_upstream import openai_chunk

CHAT = RequestContext("r", Endpoint.CHAT)
COMPLETIONS = RequestContext("r", Endpoint.COMPLETIONS)


def event(obj: Any) -> SSEEvent:
    return SSEDecoder().feed(b"data: " + orjson.dumps(obj) + b"\n\n")[0]


def completion(text: str, *, legacy_order: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text}
    if legacy_order:
        choice = {"text": text, "index": 0}
    choice |= {"logprobs": None, "finish_reason": None}
    return {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}


@pytest.mark.parametrize(
    "text", [" hello", 'say "hi"\n\tback\\slash', "Ünïcödé 日本 \U0001f980", "\x00\u2028"]
)
def test_a_plain_chat_delta_is_read_without_parsing(text: str) -> None:
    ev = event(openai_chunk(text, index=2))
    assert text_delta(CHAT, ev) == (2, text)
    assert ev._json is _UNSET, "not parsed"
    assert text_delta(COMPLETIONS, ev) is None, "a chat chunk is no completions text"


@pytest.mark.parametrize("legacy_order", [False, True])
def test_plain_completions_text_either_key_order(legacy_order: bool) -> None:
    ev = event(completion(" once", legacy_order=legacy_order))
    assert text_delta(COMPLETIONS, ev) == (0, " once")
    assert text_delta(CHAT, ev) is None


def test_usage_after_the_choices_does_not_matter() -> None:
    obj = openai_chunk(" x") | {"usage": {"prompt_tokens": 1}}
    assert text_delta(CHAT, event(obj)) == (0, " x")


@pytest.mark.parametrize(
    "obj",
    [
        openai_chunk(None, finish_reason="stop"),
        openai_chunk(" x", finish_reason="length"),
        openai_chunk("", role=True),
        openai_chunk(" x", role=True),
        openai_chunk(""),
        {"choices": [], "usage": {"prompt_tokens": 1}},
        {"choices": [{"delta": {"content": " x"}, "index": 0}]},  # another key order
        # two choices
        {
            "choices": [
                {"index": 0, "delta": {"content": "a"}, "finish_reason": None},
                {"index": 1, "delta": {"content": "b"}, "finish_reason": None},
            ]
        },
        # a second "choices" key: which one counts is the parser's business
        openai_chunk(" x") | {"extra": {"choices": []}},
        # tool calls ride in the delta too
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "a", "tool_calls": []},
                    "finish_reason": None,
                }
            ]
        },
    ],
)
def test_anything_else_is_left_to_the_parser(obj: dict[str, Any]) -> None:
    assert text_delta(CHAT, event(obj)) is None


def test_invalid_utf8_or_escapes_are_left_to_the_parser() -> None:
    raw = orjson.dumps(openai_chunk("XY"))
    for bad in (b"\xff\xfe", b"\\q"):
        ev = SSEDecoder().feed(b"data: " + raw.replace(b"XY", bad) + b"\n\n")[0]
        assert text_delta(CHAT, ev) is None


def test_comments_and_done_have_no_text() -> None:
    assert text_delta(CHAT, SSEEvent(comments=("ping",))) is None
    assert text_delta(CHAT, SSEEvent("[DONE]")) is None


def test_the_view_is_cached_on_the_event() -> None:
    ev = event(openai_chunk(" x"))
    first = text_delta(CHAT, ev)
    ev._data = orjson.dumps(openai_chunk(" changed"))
    assert text_delta(CHAT, ev) == first


TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
DELTA: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": st.one_of(st.none(), TEXT),
        "tool_calls": st.just([]),
    },
)
CHOICE = st.fixed_dictionaries(
    {"index": st.integers(0, 3), "delta": DELTA},
    optional={
        "logprobs": st.none(),
        "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length"])),
        "text": TEXT,
    },
)
CHUNK = st.fixed_dictionaries(
    {"id": st.just("chatcmpl-1"), "choices": st.lists(CHOICE, max_size=2)},
    optional={"usage": st.none(), "model": TEXT},
)


@settings(max_examples=500)
@given(CHUNK, st.sampled_from([CHAT, COMPLETIONS]))
def test_the_fast_view_never_disagrees_with_the_parsed_one(
    obj: dict[str, Any], ctx: RequestContext
) -> None:
    ev = event(obj)
    fast = text_delta(ctx, ev)
    parsed = event(obj)
    if fast is not None:
        assert event_texts(ctx, parsed) == dict([fast])
        assert finish_reasons(ctx, parsed) == {}


@settings(max_examples=200)
@given(TEXT.filter(lambda t: t not in ("", "choices")), st.integers(0, 3))
def test_openai_shaped_text_chunks_take_the_fast_view(text: str, index: int) -> None:
    # (a text "choices" makes a second "choices" string: then the parser decides)
    assert text_delta(CHAT, event(openai_chunk(text, index=index))) == (index, text)
    obj = completion(text)
    obj["choices"][0]["index"] = index
    assert text_delta(COMPLETIONS, event(obj)) == (index, text)


@settings(max_examples=200)
@given(TEXT.filter(bool), TEXT, st.booleans())
def test_replacing_a_plain_chunks_text_splices_its_bytes(old: str, new: str, chat: bool) -> None:
    obj = openai_chunk(old) if chat else completion(old)
    ctx = CHAT if chat else COMPLETIONS
    ev = event(obj)
    out = with_texts(ctx, ev, {0: new})
    expected = orjson.loads(orjson.dumps(obj))
    choice = expected["choices"][0]
    if chat:
        choice["delta"]["content"] = new
    else:
        choice["text"] = new
    assert out.json() == expected
    assert out.raw is None
    before, after = ev.data_bytes, out.data_bytes
    assert before is not None
    assert after is not None
    assert after.startswith(before[: before.index(orjson.dumps(old))]), "nothing re-encoded"
    assert text_delta(ctx, out) == ((0, new) if new else None)
    assert text_delta(ctx, out) == text_delta(ctx, event(expected)), "its cached view is right"
    made = text_event(ctx, ev, 0, new)
    assert event_texts(ctx, made) == ({0: new} if new else {})
    assert finish_reasons(ctx, made) == {}


def test_a_new_event_from_a_template_with_usage_does_not_copy_it() -> None:
    template = event(openai_chunk(" x") | {"usage": {"prompt_tokens": 1}})
    assert "usage" not in text_event(CHAT, template, 0, "y").json()


TAILS = st.sampled_from(
    [{}, {"usage": None}, {"obfuscation": "x1"}, {"x": {"choices": []}}, {"usage": {"a": 1}}]
)


@settings(max_examples=300)
@given(st.lists(st.tuples(TEXT, TAILS, st.sampled_from([None, None, None, "stop"])), max_size=8))
def test_a_streams_later_chunks_are_read_by_its_first_ones_shape(
    chunks: list[tuple[str, dict[str, Any], str | None]],
) -> None:
    """After one chunk matched the pattern, chunks of the same stream are recognised by the
    bytes around their text; the view is always the one the pattern alone gives."""
    ctx = RequestContext("r", Endpoint.CHAT)
    for text, tail, finish in chunks:
        obj = openai_chunk(text, finish_reason=finish) | tail
        alone = text_delta(RequestContext("r", Endpoint.CHAT), event(obj))
        assert text_delta(ctx, event(obj)) == alone
        if alone is not None:
            assert event_texts(ctx, event(obj)) == dict([alone])


def test_a_chunk_like_the_streams_but_with_more_in_its_delta_is_left_to_the_parser() -> None:
    ctx = RequestContext("r", Endpoint.CHAT)
    assert text_delta(ctx, event(openai_chunk(" first"))) == (0, " first")  # learns the shape
    for extra in ({"refusal": "b"}, {"tool_calls": [{"function": {"arguments": "{}"}}]}):
        odd = openai_chunk(" a")
        odd["choices"][0]["delta"].update(extra)  # after "content": the text is followed
        assert text_delta(ctx, event(odd)) is None  # by more than the usual bytes
    assert text_delta(ctx, event(openai_chunk(' say "hi"'))) == (0, ' say "hi"')
