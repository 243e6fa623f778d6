"""OpenAI chat requests as Anthropic Messages requests (the request half of
:mod:`gateway.translate.anthropic_openai`)."""

from __future__ import annotations

from typing import Any, Final

import orjson

from gateway.errors import bad_request

_EMPTY_SCHEMA: Final[dict[str, Any]] = {"type": "object", "properties": {}}
_SYSTEM_SEPARATOR: Final = "\n\n"


# ----- requests -------------------------------------------------------------------------------


def chat_request_to_messages(
    body: dict[str, Any], upstream_model: str, default_max_tokens: int = 4096
) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request for ``upstream_model``.

    - ``system`` and ``developer`` messages, wherever they are, become the top-level
      ``system`` string (their texts joined by a blank line);
    - user/assistant text and ``image_url`` parts become content blocks (``data:`` URLs a
      base64 source, http(s) URLs a url source); assistant ``tool_calls`` become ``tool_use``
      blocks (arguments parsed; they must be a JSON object); ``tool`` messages become
      ``tool_result`` blocks in a user turn. Consecutive turns of the same role are merged
      (Anthropic requires alternation), tool results first in a merged user turn; empty texts
      are left out; a turn that is one text block is sent as a plain string;
    - ``tools`` (function tools) -> name/description/input_schema; ``tool_choice`` auto,
      none, required (-> any) or a named function (-> tool); ``parallel_tool_calls: false``
      -> ``disable_parallel_tool_use``;
    - ``stop`` (string or list) -> ``stop_sequences``; ``max_completion_tokens``, else
      ``max_tokens``, else ``default_max_tokens`` -> ``max_tokens`` (required by Anthropic);
      ``temperature``, ``top_p``, ``top_k`` as given (temperature is not rescaled: OpenAI
      allows up to 2, Anthropic up to 1, and the upstream says so rather than the gateway
      silently changing it); ``stream``; ``user`` -> ``metadata.user_id``.

    Dropped without error (no Anthropic equivalent, or handled elsewhere):
    ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs``,
    ``top_logprobs``, ``seed``, ``response_format``, ``stream_options`` (the proxy passes
    ``include_usage`` to :class:`MessagesStreamToChat`), ``service_tier``, ``store``,
    ``metadata``, ``modalities``, ``audio``, ``prediction``, ``reasoning_effort``,
    ``web_search_options``, the legacy ``functions``/``function_call``, a tool's ``strict``,
    an image's ``detail``, and a message's ``name``.

    Raises a 400 GatewayError for what cannot be expressed: ``n`` > 1, an unknown role,
    content parts other than text/image, non-function tools, a tool message without
    ``tool_call_id``, tool-call arguments that are not a JSON object.
    """
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("Anthropic upstreams return one choice: 'n' must be 1.", param="n")
    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be a list.", param="messages")
    for i, msg in enumerate(messages):
        _add_message(system, turns, msg, i)
    out: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": _max_tokens(body, default_max_tokens),
        "messages": [_turn(role, blocks) for role, blocks in turns],
    }
    if system:
        out["system"] = _SYSTEM_SEPARATOR.join(system)
    _add_tools(out, body)
    _add_sampling(out, body)
    return out


def _add_message(
    system: list[str], turns: list[tuple[str, list[dict[str, Any]]]], msg: Any, i: int
) -> None:
    if not isinstance(msg, dict):
        raise bad_request(f"messages[{i}] must be an object.", param=f"messages[{i}]")
    role = msg.get("role")
    if role in ("system", "developer"):
        text = _plain_text(msg.get("content"), f"messages[{i}].content")
        if text:
            system.append(text)
    elif role == "user":
        _append_turn(turns, "user", _user_blocks(msg.get("content"), i))
    elif role == "assistant":
        _append_turn(turns, "assistant", _assistant_blocks(msg, i))
    elif role == "tool":
        _append_turn(turns, "user", [_tool_result(msg, i)])
    else:
        raise bad_request(
            f"messages[{i}].role {role!r} is not supported by Anthropic upstreams.",
            param=f"messages[{i}].role",
        )


def _append_turn(
    turns: list[tuple[str, list[dict[str, Any]]]], role: str, blocks: list[dict[str, Any]]
) -> None:
    """Add a turn, merging it into the previous one of the same role."""
    if not blocks:
        return
    if turns and turns[-1][0] == role:
        merged = turns[-1][1] + blocks
        if role == "user":  # Anthropic wants tool results before anything else in a turn
            merged.sort(key=lambda block: block["type"] != "tool_result")
        turns[-1] = (role, merged)
    else:
        turns.append((role, blocks))


def _turn(role: str, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return {"role": role, "content": blocks[0]["text"]}
    return {"role": role, "content": blocks}


def _plain_text(content: Any, where: str) -> str:
    """The text of a string content or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
                raise bad_request(f"{where}[{j}] must be a text part.", param=f"{where}[{j}]")
            text = part.get(part["type"])
            if isinstance(text, str):
                texts.append(text)
        return "".join(texts)
    raise bad_request(f"{where} must be a string or a list of parts.", param=where)


def _user_blocks(content: Any, i: int) -> list[dict[str, Any]]:
    where = f"messages[{i}].content"
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of parts.", param=where)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if isinstance(text, str) and text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url"), f"{where}[{j}]"))
        else:
            raise bad_request(
                f"{where}[{j}]: content part type {kind!r} is not supported by Anthropic "
                "upstreams (text and image_url are).",
                param=f"{where}[{j}]",
            )
    return blocks


def _image_block(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise bad_request(f"{where}.image_url.url must be a string.", param=where)
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not media_type:
            raise bad_request(
                f"{where}: a data: image URL must be 'data:<media type>;base64,<data>'.",
                param=where,
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise bad_request(f"{where}: image URLs must be data: or http(s) URLs.", param=where)


def _assistant_blocks(msg: dict[str, Any], i: int) -> list[dict[str, Any]]:
    text = _plain_text(msg.get("content"), f"messages[{i}].content")
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise bad_request(f"messages[{i}].tool_calls must be a list.")
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise bad_request(f"{where} must have an id and a function.", param=where)
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": fn.get("name"),
                "input": _arguments(fn.get("arguments"), where),
            }
        )
    return blocks


def _arguments(arguments: Any, where: str) -> dict[str, Any]:
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise bad_request(
            f"{where}.function.arguments must be a JSON object.",
            param=f"{where}.function.arguments",
        )
    return parsed


def _tool_result(msg: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(
            f"messages[{i}].tool_call_id is required for tool messages.",
            param=f"messages[{i}].tool_call_id",
        )
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    text = _plain_text(msg.get("content"), f"messages[{i}].content")
    if text:
        block["content"] = text
    return block


def _max_tokens(body: dict[str, Any], default: int) -> Any:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            return value
    return default


def _add_tools(out: dict[str, Any], body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if not tools:
        return
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list.", param="tools")
    converted: list[dict[str, Any]] = []
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            raise bad_request(
                f"tools[{j}]: only function tools are supported by Anthropic upstreams.",
                param=f"tools[{j}]",
            )
        entry: dict[str, Any] = {"name": fn.get("name")}
        if fn.get("description"):
            entry["description"] = fn["description"]
        entry["input_schema"] = fn.get("parameters") or _EMPTY_SCHEMA
        converted.append(entry)
    out["tools"] = converted
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    simple = {"auto": "auto", "none": "none", "required": "any"}
    if isinstance(choice, str) and choice in simple:
        return {"type": simple[choice]}
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return {"type": "tool", "name": fn["name"]}
    raise bad_request(
        "'tool_choice' must be auto, none, required or a named function.", param="tool_choice"
    )


def _add_sampling(out: dict[str, Any], body: dict[str, Any]) -> None:
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stream") is True:
        out["stream"] = True
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
