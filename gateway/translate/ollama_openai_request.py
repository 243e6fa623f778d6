"""OpenAI request bodies as Ollama's native ones (``/api/chat``, ``/api/generate``); see
:mod:`gateway.translate.ollama_openai`. What Ollama cannot do is a 400 naming the parameter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from gateway.errors import GatewayError, bad_request

# Ollama runtime options a client may set as top-level body fields (the OpenAI SDK's
# `extra_body`) or inside an `options` object. Sampling only: options that size or place the
# model in memory (num_ctx, num_gpu, num_thread, use_mmap, ...) would let one client reload
# or starve the server, so they come only from the operator (`defaults=`).
SAMPLING_OPTIONS: Final = frozenset(
    {
        "top_k",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "penalize_newline",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "tfs_z",
        "num_keep",
    }
)
# OpenAI field -> Ollama option, same meaning and type.
_NUMBER_OPTIONS: Final = {
    "temperature": "temperature",
    "top_p": "top_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_THINK_LEVELS: Final = frozenset({"low", "medium", "high"})
_ROLES: Final = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_DATA_URL: Final = re.compile(r"data:image/[A-Za-z0-9.+-]+(?:;[^;,]*)*;base64,(.*)", re.S)


# ----- requests ---------------------------------------------------------------------------


def chat_request_to_ollama(
    body: Mapping[str, Any],
    upstream_model: str,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An OpenAI chat request as a ``POST /api/chat`` body.

    ``defaults`` are operator-set Ollama options (e.g. ``num_ctx``); client fields override
    them only for sampling options. Raises GatewayError 400 for what Ollama cannot serve.
    ``stream_options`` is not sent: the stream translator honours ``include_usage`` itself.
    ``tool_choice`` other than ``"none"`` is not supported by Ollama and is ignored.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("`messages` is required and must be an array.", param="messages")
    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": _messages(messages),
        "stream": body.get("stream") is True,
    }
    tools = _tools(body)
    if tools:
        out["tools"] = tools
    _common(body, out, defaults)
    return out


def completion_request_to_ollama(
    body: Mapping[str, Any],
    upstream_model: str,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An OpenAI (legacy) completion request as a ``POST /api/generate`` body.

    The prompt goes through the model's template like Ollama's own ``/v1/completions``;
    a client sends ``raw: true`` (``extra_body``) for untemplated continuation.
    """
    out: dict[str, Any] = {
        "model": upstream_model,
        "prompt": _prompt(body.get("prompt")),
        "stream": body.get("stream") is True,
    }
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise bad_request("`suffix` must be a string.", param="suffix", code="invalid_type")
        out["suffix"] = suffix
    if body.get("echo") is True:
        raise _unsupported("`echo` is not supported by this model's upstream (Ollama).", "echo")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise _unsupported("`best_of` must be 1 for this model's upstream (Ollama).", "best_of")
    raw = body.get("raw")
    if raw is not None:
        if not isinstance(raw, bool):
            raise bad_request("`raw` must be a boolean.", param="raw", code="invalid_type")
        out["raw"] = raw
    _common(body, out, defaults)
    return out


def _unsupported(message: str, param: str) -> GatewayError:
    return bad_request(message, param=param, code="unsupported_parameter")


def _common(
    body: Mapping[str, Any], out: dict[str, Any], defaults: Mapping[str, Any] | None
) -> None:
    """Fields /api/chat and /api/generate share: options, format, keep_alive, think."""
    n = body.get("n")
    if n is not None and n != 1:
        raise _unsupported("`n` must be 1 for this model's upstream (Ollama).", "n")
    options = _options(body, defaults)
    if options:
        out["options"] = options
    fmt = _format(body.get("response_format"))
    if fmt is not None:
        out["format"] = fmt
    keep_alive = body.get("keep_alive")
    if keep_alive is not None:
        if isinstance(keep_alive, bool) or not isinstance(keep_alive, str | int | float):
            raise bad_request(
                "`keep_alive` must be a duration string or a number of seconds.",
                param="keep_alive",
                code="invalid_type",
            )
        out["keep_alive"] = keep_alive
    think = body.get("think")
    if think is not None:
        if not (isinstance(think, bool) or think in _THINK_LEVELS):
            raise bad_request(
                "`think` must be a boolean or one of low, medium, high.",
                param="think",
                code="invalid_value",
            )
        out["think"] = think


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _options(body: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    options: dict[str, Any] = dict(defaults or {})
    for field, option in _NUMBER_OPTIONS.items():
        value = body.get(field)
        if value is None:
            continue
        if not _is_number(value):
            raise bad_request(f"`{field}` must be a number.", param=field, code="invalid_type")
        options[option] = value
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad_request("`seed` must be an integer.", param="seed", code="invalid_type")
        options["seed"] = seed
    for field in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(
                f"`{field}` must be a positive integer.", param=field, code="invalid_value"
            )
        options["num_predict"] = value
    stop = _stop(body.get("stop"))
    if stop is not None:
        options["stop"] = stop
    _sampling_options(body, options)
    return options


def _sampling_options(body: Mapping[str, Any], options: dict[str, Any]) -> None:
    """Ollama sampling options from an `options` object, then from top-level fields."""
    extra = body.get("options")
    if extra is not None and not isinstance(extra, dict):
        raise bad_request("`options` must be an object.", param="options", code="invalid_type")
    for source, prefix in ((extra or {}, "options."), (body, "")):
        for name in SAMPLING_OPTIONS.intersection(source):
            value = source[name]
            if value is None:
                continue
            if not (_is_number(value) or isinstance(value, bool)):
                raise bad_request(
                    f"`{prefix}{name}` must be a number.",
                    param=prefix + name,
                    code="invalid_type",
                )
            options[name] = value


def _stop(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop) or None
    raise bad_request(
        "`stop` must be a string or an array of strings.", param="stop", code="invalid_type"
    )


def _format(response_format: Any) -> Any:
    """OpenAI ``response_format`` as Ollama ``format``: "json", a JSON schema, or None."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request(
                "`response_format.json_schema.schema` must be an object.",
                param="response_format",
                code="invalid_value",
            )
        return schema
    raise bad_request(
        "`response_format.type` must be text, json_object or json_schema.",
        param="response_format",
        code="invalid_value",
    )


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None or body.get("tool_choice") == "none":
        return None
    if not isinstance(tools, list):
        raise bad_request("`tools` must be an array.", param="tools", code="invalid_type")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise _unsupported(
                f"`tools[{i}]` must be a function tool with a name "
                "(the only kind this model's upstream supports).",
                f"tools[{i}]",
            )
        out.append({"type": "function", "function": function})
    return out


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    out = []
    tool_names: dict[str, str] = {}  # tool_call_id -> function name, the latest call wins
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"`messages[{i}]` must be an object.", param=f"messages[{i}]")
        out.append(_message(message, i, tool_names))
    return out


def _message(message: dict[str, Any], i: int, tool_names: dict[str, str]) -> dict[str, Any]:
    role = message.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise bad_request(
            f"`messages[{i}].role` must be one of system, developer, user, assistant, tool.",
            param=f"messages[{i}].role",
            code="invalid_value",
        )
    text, images = _content(message.get("content"), f"messages[{i}].content")
    out: dict[str, Any] = {"role": role, "content": text}
    if images:
        out["images"] = images
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls:
            out["tool_calls"] = _request_tool_calls(calls, i, tool_names)
        thinking = message.get("reasoning_content")
        if isinstance(thinking, str) and thinking:
            out["thinking"] = thinking
    elif role == "tool":
        name = message.get("name") if message.get("role") == "function" else None
        call_id = message.get("tool_call_id")
        if name is None and isinstance(call_id, str):
            name = tool_names.get(call_id)
        if isinstance(name, str):
            out["tool_name"] = name
    return out


def _content(content: Any, param: str) -> tuple[str, list[str]]:
    """Message content as (text, base64 images); text parts are joined with newlines."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request(f"`{param}` must be a string or an array of parts.", param=param)
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            images.append(_image(url, f"{param}[{j}].image_url"))
        else:
            raise _unsupported(
                f"`{param}[{j}]` must be a text or image_url part "
                "(the only kinds this model's upstream supports).",
                f"{param}[{j}]",
            )
    return "\n".join(texts), images


def _image(url: Any, param: str) -> str:
    """The base64 payload of an image ``data:`` URL; Ollama cannot fetch remote images."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise _unsupported(
            f"`{param}` must be a base64 data: URL; this model's upstream (Ollama) "
            "cannot fetch images by URL.",
            param,
        )
    match = _DATA_URL.fullmatch(url)
    payload = "".join(match.group(1).split()) if match else ""
    if not match or not payload or not _BASE64.fullmatch(payload):
        raise bad_request(
            f"`{param}` is not a valid base64 image data: URL.", param=param, code="invalid_value"
        )
    return payload


def _request_tool_calls(calls: Any, i: int, tool_names: dict[str, str]) -> list[dict[str, Any]]:
    """OpenAI assistant tool_calls (arguments a JSON string) as Ollama's (an object)."""
    if not isinstance(calls, list):
        raise bad_request(
            f"`messages[{i}].tool_calls` must be an array.", param=f"messages[{i}].tool_calls"
        )
    out = []
    for j, call in enumerate(calls):
        param = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise bad_request(f"`{param}.function` is required.", param=param)
        function = call["function"]
        name = function.get("name")
        if not isinstance(name, str):
            raise bad_request(f"`{param}.function.name` is required.", param=param)
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            parsed: Any = {}
        elif isinstance(arguments, str):
            try:
                parsed = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                parsed = None
        else:
            parsed = arguments
        if not isinstance(parsed, dict):
            raise bad_request(
                f"`{param}.function.arguments` must be a JSON object.",
                param=f"{param}.function.arguments",
                code="invalid_value",
            )
        call_id = call.get("id")
        if isinstance(call_id, str):
            tool_names[call_id] = name
        out.append({"function": {"name": name, "arguments": parsed}})
    return out


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        raise _unsupported(
            "`prompt` must be a single string for this model's upstream (Ollama).", "prompt"
        )
    raise _unsupported(
        "`prompt` must be a string; token arrays are not supported by this model's upstream "
        "(Ollama).",
        "prompt",
    )
