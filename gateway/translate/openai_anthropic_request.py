"""Anthropic Messages requests as OpenAI chat requests (the request half of
:mod:`gateway.translate.openai_anthropic`)."""

from __future__ import annotations

from typing import Any, Final

import orjson

from gateway.errors import GatewayError, bad_request

_SYSTEM_SEPARATOR: Final = "\n\n"
_TOOL_RESULT_SEPARATOR: Final = "\n"


# ----- requests -------------------------------------------------------------------------------


def messages_request_to_chat(
    body: dict[str, Any], upstream_model: str, *, max_tokens_field: str = "max_tokens"
) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request for ``upstream_model``.

    - ``system`` (a string, or text blocks joined by a blank line) -> a leading system
      message;
    - user content: text and image blocks (base64 -> ``data:`` URL, url -> URL) become
      content parts (a lone text as a plain string); ``tool_result`` blocks become ``tool``
      messages placed before the rest of the turn (their text blocks joined by a newline;
      images from a tool result move into the user message that follows, since OpenAI tool
      messages are text only);
    - assistant content: text blocks concatenated into ``content`` (``None`` if there is only
      tool use), ``tool_use`` blocks -> ``tool_calls`` (input serialised as the arguments
      string); ``thinking``/``redacted_thinking`` blocks are dropped (an OpenAI upstream
      cannot verify or use them);
    - ``tools`` -> function tools (``input_schema`` -> ``parameters``); ``tool_choice`` auto,
      any (-> required), tool (-> named function), none; ``disable_parallel_tool_use`` ->
      ``parallel_tool_calls: false``;
    - ``stop_sequences`` -> ``stop``; ``max_tokens`` -> ``max_tokens_field`` (``max_tokens``,
      which every compatible server takes; pass ``max_completion_tokens`` for OpenAI's
      reasoning models); ``temperature``, ``top_p``, ``top_k`` as given (``top_k`` is not an
      OpenAI parameter: vLLM and most compatibles take it, api.openai.com rejects it);
      ``metadata.user_id`` -> ``user``; ``stream`` -> ``stream`` plus
      ``stream_options.include_usage`` (so :class:`ChatStreamToMessages` can report usage).

    Dropped without error: ``cache_control`` everywhere, ``citations``, a tool result's
    ``is_error``, ``thinking``, ``service_tier``, ``container``, ``mcp_servers``,
    ``context_management``, other ``metadata``. Raises a 400 GatewayError for what an OpenAI
    upstream cannot take: documents, other block types, server tools (no ``input_schema``).
    """
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    source = body.get("messages")
    if not isinstance(source, list):
        raise bad_request("'messages' must be a list.", param="messages")
    for i, msg in enumerate(source):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise bad_request(
                f"messages[{i}] must have role user or assistant.", param=f"messages[{i}]"
            )
        if msg["role"] == "user":
            messages += _user_messages(msg.get("content"), i)
        else:
            messages.append(_assistant_message(msg.get("content"), i))
    out: dict[str, Any] = {"model": upstream_model, "messages": messages}
    if body.get("max_tokens") is not None:
        out[max_tokens_field] = body["max_tokens"]
    _add_tools(out, body)
    _add_sampling(out, body)
    return out


def _system_text(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise bad_request("'system' must be a string or a list of text blocks.", param="system")
    texts: list[str] = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad_request(f"system[{j}] must be a text block.", param=f"system[{j}]")
        if isinstance(block.get("text"), str) and block["text"]:
            texts.append(block["text"])
    return _SYSTEM_SEPARATOR.join(texts)


def _blocks(content: Any, i: int) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        where = f"messages[{i}].content"
        raise bad_request(f"{where} must be a string or a list of blocks.", param=where)
    return content


def _text_of(block: dict[str, Any], where: str) -> str:
    """A text block's text; a 400 if it is not a string (Anthropic requires one)."""
    text = block.get("text", "")
    if not isinstance(text, str):
        raise bad_request(f"{where}.text must be a string.", param=where)
    return text


def _unsupported(kind: Any, where: str) -> GatewayError:
    return bad_request(
        f"{where}: content block type {kind!r} is not supported by OpenAI-compatible upstreams.",
        param=where,
    )


def _user_messages(content: Any, i: int) -> list[dict[str, Any]]:
    """A user turn: its tool results as tool messages first, then the rest as a user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[dict[str, Any]] = []
    deferred: list[dict[str, Any]] = []  # images out of tool results
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, i)):
        where = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, where)})
        elif kind == "image":
            parts.append(_image_part(block, where))
        elif kind == "tool_result":
            tools.append(_tool_message(block, where, deferred))
        else:
            raise _unsupported(kind, where)
    parts = deferred + parts
    if not parts:
        return tools
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [*tools, {"role": "user", "content": parts[0]["text"]}]
    return [*tools, {"role": "user", "content": parts}]


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict):
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise bad_request(f"{where}: image source {kind!r} is not supported.", param=where)
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_message(
    block: dict[str, Any], where: str, deferred: list[dict[str, Any]]
) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise bad_request(f"{where}.tool_use_id must be a string.", param=where)
    content = block.get("content")
    if content is None or isinstance(content, str):
        return {"role": "tool", "tool_call_id": call_id, "content": content or ""}
    texts: list[str] = []
    for k, inner in enumerate(_blocks(content, 0)):
        kind = inner.get("type") if isinstance(inner, dict) else None
        if kind == "text":
            texts.append(_text_of(inner, f"{where}.content[{k}]"))
        elif kind == "image":
            deferred.append(_image_part(inner, f"{where}.content[{k}]"))
        else:
            raise _unsupported(kind, f"{where}.content[{k}]")
    return {
        "role": "tool",
        "tool_call_id": call_id,
        "content": _TOOL_RESULT_SEPARATOR.join(texts),
    }


def _assistant_message(content: Any, i: int) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, i)):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_of(block, f"messages[{i}].content[{j}]"))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        elif kind not in ("thinking", "redacted_thinking"):
            raise _unsupported(kind, f"messages[{i}].content[{j}]")
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _add_tools(out: dict[str, Any], body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if not tools:
        return
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list.", param="tools")
    converted: list[dict[str, Any]] = []
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("input_schema"), dict):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(
                f"tools[{j}]: only client tools with an input_schema are supported by "
                f"OpenAI-compatible upstreams (got type {kind!r}).",
                param=f"tools[{j}]",
            )
        fn: dict[str, Any] = {"name": tool.get("name")}
        if tool.get("description"):
            fn["description"] = tool["description"]
        fn["parameters"] = tool["input_schema"]
        converted.append({"type": "function", "function": fn})
    out["tools"] = converted
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool" and isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "any", "none"):
            out["tool_choice"] = "required" if kind == "any" else kind
        else:
            raise bad_request("'tool_choice' must be auto, any, tool or none.", param="tool_choice")
        if choice.get("disable_parallel_tool_use") is True:
            out["parallel_tool_calls"] = False


def _add_sampling(out: dict[str, Any], body: dict[str, Any]) -> None:
    stop = body.get("stop_sequences")
    if isinstance(stop, list) and stop:
        out["stop"] = stop
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if isinstance(user, str) and user:
        out["user"] = user
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
