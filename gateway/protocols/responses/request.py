"""A Responses request as an OpenAI chat request: the translated lane's way in (pure).

What maps, what is dropped and what is refused is written down in docs/responses.md (the
loss table); tests/unit/test_responses_request.py holds a test per row.
"""

from __future__ import annotations

from typing import Any, Final, cast

import orjson

from gateway.errors import GatewayError, bad_request
from gateway.protocols.responses.types import (
    FunctionCallItem,
    FunctionCallOutputItem,
    Item,
    MessageItem,
)

__all__ = ["input_items", "responses_request_to_chat", "validate_request"]

_ROLES: Final = ("user", "assistant", "system", "developer")
_TOOL_CHOICES: Final = ("auto", "none", "required")
# Fields refused on the translated lane: what they ask for cannot happen without them.
_REFUSED: Final[dict[str, str]] = {
    "background": "background responses",
    "conversation": "the Conversations API",
    "prompt": "stored prompts",
}


def _expect(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> None:
    value = body.get(name)
    if value is None:
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise bad_request(f"`{name}` must be {what}.", param=name, code="invalid_type")


def validate_request(body: dict[str, Any]) -> None:
    """Check the fields the gateway itself reads (any lane); a 400 naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required and must be a non-empty string.", param="model")
    if "input" not in body and not body.get("previous_response_id"):
        raise bad_request("`input` is required.", param="input")
    _expect(body, "input", (str, list), "a string or an array of items")
    _expect(body, "instructions", str, "a string")
    _expect(body, "previous_response_id", str, "a string")
    _expect(body, "store", bool, "a boolean")
    _expect(body, "max_output_tokens", int, "an integer")
    _expect(body, "tools", list, "an array")
    _expect(body, "text", dict, "an object")
    _expect(body, "reasoning", dict, "an object")
    _expect(body, "metadata", dict, "an object")
    _expect(body, "parallel_tool_calls", bool, "a boolean")
    _expect(body, "stream", bool, "a boolean")
    max_output = body.get("max_output_tokens")
    if isinstance(max_output, int) and max_output < 1:
        raise bad_request(
            "`max_output_tokens` must be at least 1.",
            param="max_output_tokens",
            code="invalid_value",
        )


# ----- input items ----------------------------------------------------------------------------


def input_items(body: dict[str, Any]) -> list[Item]:
    """The request's ``input`` as items (a string is one user message), each checked."""
    source = body.get("input")
    if source is None:
        return []
    if isinstance(source, str):
        return [{"type": "message", "role": "user", "content": source}]
    items: list[Item] = []
    for i, raw in enumerate(cast("list[Any]", source)):
        where = f"input[{i}]"
        if not isinstance(raw, dict):
            raise bad_request(f"`{where}` must be an object.", param=where)
        kind = raw.get("type", "message")  # EasyInputMessage has no type
        if kind == "message":
            items.append(_message_item(raw, where))
        elif kind == "function_call":
            items.append(_function_call_item(raw, where))
        elif kind == "function_call_output":
            items.append(_function_output_item(raw, where))
        elif kind == "reasoning":
            continue  # a chat upstream cannot take reasoning back: dropped (loss table)
        else:
            raise bad_request(
                f"`{where}`: input items of type {kind!r} are not supported on this route "
                "(it is translated to chat completions).",
                param=where,
                code="unsupported_input_item",
            )
    return items


def _message_item(raw: dict[str, Any], where: str) -> MessageItem:
    role = raw.get("role")
    if role not in _ROLES:
        raise bad_request(
            f"`{where}.role` must be one of user, assistant, system, developer.",
            param=f"{where}.role",
        )
    content = raw.get("content")
    if isinstance(content, str):
        return {"type": "message", "role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(
            f"`{where}.content` must be a string or an array of parts.", param=f"{where}.content"
        )
    parts: list[Any] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "refusal"):
            text = part.get("text") if kind != "refusal" else part.get("refusal")
            if not isinstance(text, str):
                raise bad_request(f"`{at}.text` must be a string.", param=at)
            if kind == "input_text":
                parts.append({"type": "input_text", "text": text})
            else:
                parts.append({"type": "output_text", "text": text, "annotations": []})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"type": "input_image", "image_url": part["image_url"]}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append(image)
        else:
            raise bad_request(
                f"`{at}`: content parts of type {kind!r} are not supported on this route "
                "(input_image needs an image_url; file ids and input_file need OpenAI's own "
                "Responses API).",
                param=at,
                code="unsupported_content",
            )
    return {"type": "message", "role": role, "content": parts}


def _string(raw: dict[str, Any], name: str, where: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str):
        raise bad_request(f"`{where}.{name}` must be a string.", param=f"{where}.{name}")
    return value


def _function_call_item(raw: dict[str, Any], where: str) -> FunctionCallItem:
    item: FunctionCallItem = {
        "type": "function_call",
        "call_id": _string(raw, "call_id", where),
        "name": _string(raw, "name", where),
        "arguments": _string(raw, "arguments", where),
    }
    if isinstance(raw.get("id"), str):
        item["id"] = raw["id"]
    return item


def _function_output_item(raw: dict[str, Any], where: str) -> FunctionCallOutputItem:
    output = raw.get("output")
    if isinstance(output, list):  # input_text parts (images cannot go into a tool message)
        texts = []
        for j, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") != "input_text":
                raise bad_request(
                    f"`{where}.output[{j}]`: only input_text parts can be sent to this route.",
                    param=f"{where}.output[{j}]",
                )
            texts.append(str(part.get("text", "")))
        output = "".join(texts)
    if not isinstance(output, str):
        raise bad_request(f"`{where}.output` must be a string.", param=f"{where}.output")
    return {
        "type": "function_call_output",
        "call_id": _string(raw, "call_id", where),
        "output": output,
    }


# ----- items -> chat messages ------------------------------------------------------------------


def _chat_content(item: MessageItem) -> str | list[dict[str, Any]]:
    content = item["content"]
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "input_image":
            url: dict[str, Any] = {"url": part["image_url"]}
            if "detail" in part:
                url["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": url})
        else:
            parts.append({"type": "text", "text": part["text"]})
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def items_to_messages(items: list[Item]) -> list[dict[str, Any]]:
    """Conversation items as chat messages: consecutive function calls join one assistant
    message's ``tool_calls`` (after its text, if the message just before was the
    assistant's), outputs become ``tool`` messages, reasoning is dropped."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _chat_content(item)})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif (
                last is not None
                and last["role"] == "assistant"
                and isinstance(last.get("content"), str)
            ):
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item["type"] == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
    return messages


# ----- the request --------------------------------------------------------------------------------


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Function tools in chat's shape. Other tools (built-in ones such as web_search, and
    `namespace` or `custom` tools) are dropped: a chat upstream cannot run them, and agents
    such as Codex send them with every request (the loss table says so)."""
    converted: list[dict[str, Any]] = []
    for j, tool in enumerate(body.get("tools") or []):
        where = f"tools[{j}]"
        if not isinstance(tool, dict):
            raise bad_request(f"`{where}` must be an object.", param=where)
        if tool.get("type") != "function":
            continue
        if not isinstance(tool.get("name"), str):
            raise bad_request(f"`{where}.name` must be a string.", param=f"{where}.name")
        fn: dict[str, Any] = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
        if isinstance(tool.get("strict"), bool):
            fn["strict"] = tool["strict"]
        converted.append({"type": "function", "function": fn})
    return converted


def _tool_choice(choice: Any) -> Any:
    if choice in _TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if isinstance(name, str):
            return {"type": "function", "function": {"name": name}}
    raise bad_request(
        "`tool_choice` must be auto, none, required or {type: function, name} on this route.",
        param="tool_choice",
        code="unsupported_tool_choice",
    )


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise bad_request(
        "`text.format` must be text, json_object or json_schema (with a schema).",
        param="text.format",
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, what in _REFUSED.items():
        if body.get(name):
            raise bad_request(
                f"`{name}`: {what} are not supported on this route (it is translated to chat "
                "completions).",
                param=name,
                code="unsupported_parameter",
            )


def responses_request_to_chat(
    body: dict[str, Any], upstream_model: str, conversation: list[Item]
) -> dict[str, Any]:
    """The chat request for ``body``, whose items so far are ``conversation`` (the stored
    turns of ``previous_response_id`` followed by this request's input items).

    ``instructions`` becomes a leading system message (a previous response's instructions
    are not carried over, as with OpenAI); ``max_output_tokens`` -> ``max_tokens``;
    ``temperature``, ``top_p``, ``parallel_tool_calls``, ``user`` (or ``safety_identifier``)
    as given; ``reasoning.effort`` -> ``reasoning_effort``; ``text.format`` ->
    ``response_format``; function ``tools`` and ``tool_choice`` to their chat shapes;
    ``stream`` -> ``stream`` with ``stream_options.include_usage``; tools other than
    functions are dropped. Raises a 400 GatewayError for what chat cannot express (files,
    item references, background).
    """
    _refuse_unsupported(body)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    messages += items_to_messages(conversation)
    if not messages:
        raise bad_request("`input` must hold at least one item.", param="input")
    out: dict[str, Any] = {"model": upstream_model, "messages": messages}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(name) is not None:
            out[name] = body[name]
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["user"] = user
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if isinstance(effort, str):
        out["reasoning_effort"] = effort
    tools = _tools(body)
    if tools:
        out["tools"] = tools
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def item_bytes(items: list[Item]) -> int:
    """The JSON size of ``items`` (what a store entry costs)."""
    return len(orjson.dumps(items))


def missing_previous(response_id: str) -> GatewayError:
    """The 404 for a ``previous_response_id`` the gateway does not hold (for this caller)."""
    return GatewayError(
        404,
        f"Previous response with id '{response_id[:100]}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )
