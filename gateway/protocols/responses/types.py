"""Typed shapes of the Responses API as the gateway reads and writes them.

Requests arrive as JSON and are checked field by field in :mod:`.request` (only what the
translation needs; a native upstream judges the rest), so these TypedDicts describe what
was checked, not a schema that rejects unknown keys.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class InputText(TypedDict):
    """``{"type": "input_text", "text": ...}`` (user, system and developer content)."""

    type: Literal["input_text"]
    text: str


class InputImage(TypedDict):
    """``{"type": "input_image", "image_url": ...}``."""

    type: Literal["input_image"]
    image_url: str
    detail: NotRequired[str]


class OutputText(TypedDict):
    """Assistant text: ``{"type": "output_text", "text": ..., "annotations": []}``."""

    type: Literal["output_text"]
    text: str
    annotations: list[object]


class MessageItem(TypedDict):
    """A message input or output item."""

    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText | InputImage | OutputText]
    id: NotRequired[str]
    status: NotRequired[str]


class FunctionCallItem(TypedDict):
    """A call the model made: ``arguments`` is a JSON string."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: NotRequired[str]
    status: NotRequired[str]


class FunctionCallOutputItem(TypedDict):
    """The client's result for a call, sent back as input."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: NotRequired[str]


class SummaryText(TypedDict):
    """One reasoning summary part."""

    type: Literal["summary_text"]
    text: str


class ReasoningItem(TypedDict):
    """The model's reasoning (here: its summary, from a chat upstream's reasoning deltas)."""

    type: Literal["reasoning"]
    id: str
    summary: list[SummaryText]
    status: NotRequired[str]


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
"""An item of a conversation: input items, and output items fed back as input."""


class InputTokensDetails(TypedDict):
    """Cache counts within ``input_tokens``."""

    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(TypedDict):
    """Reasoning counts within ``output_tokens``."""

    reasoning_tokens: int


class Usage(TypedDict):
    """A Response's ``usage``."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(TypedDict):
    """A failed Response's ``error``."""

    code: str
    message: str


class IncompleteDetails(TypedDict):
    """Why a Response is ``incomplete``."""

    reason: Literal["max_output_tokens", "content_filter"]


Status = Literal["in_progress", "completed", "incomplete", "failed"]


class Response(TypedDict):
    """The Response object (``"object": "response"``), streamed inside lifecycle events."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Status
    model: str
    output: list[Item]
    usage: Usage | None
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, object]
    store: bool
    temperature: float | None
    text: dict[str, object]
    tool_choice: object
    tools: list[object]
    top_p: float | None
    truncation: str
