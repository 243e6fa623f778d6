"""What the replay cache may answer, and under which key.

A request is deterministic when its body (as the chain sees it, after the lane's
translation and the plugins' `on_request`) asks for temperature 0 or names an integer
`seed`; several choices (`n > 1`) only at temperature 0. A missing temperature is not 0:
OpenAI's default is 1. Embeddings are not replayed (nothing is sampled there).

The key is the sha256 of canonical JSON (sorted keys) of everything that shapes the bytes
the client gets: the whole body (messages or input, system, tools, tool_choice,
response_format, sampling parameters, max_tokens, stop, stream and stream_options), the
client's format and endpoint, the route and the model names its deployments are sent, and
the team unless the route's `replay.shared` is set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

import orjson

from gateway.context import Endpoint, RequestContext

VERSION: Final = 1  # bumped when the key or the stored format changes


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def deterministic(body: Mapping[str, Any]) -> bool:
    """Temperature 0, or an explicit integer seed; several choices only at temperature 0."""
    temperature = _number(body.get("temperature"))
    seed = body.get("seed")
    cold = temperature == 0.0
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1 and not cold:
        return False
    return cold or seeded


def cacheable(ctx: RequestContext) -> bool:
    """Whether `ctx`'s request may be answered from (and kept in) the cache."""
    if ctx.endpoint is Endpoint.EMBEDDINGS:
        return False
    return deterministic(ctx.body)


def request_key(ctx: RequestContext, *, shared: bool) -> str | None:
    """The cache key of `ctx`'s request (hex), or None if its body cannot be canonicalised."""
    route = ctx.route
    assert route is not None
    deployments = sorted((d.upstream, d.upstream_model or "") for d in route.all_deployments)
    material = {
        "v": VERSION,
        "route": route.name,
        "model": ctx.model,
        "deployments": deployments,
        "client": ctx.client_format,
        "endpoint": ctx.endpoint.value,
        "wire": ctx.wire,
        "stream": ctx.stream,
        "team": None if shared else ctx.identity.team,
        "body": ctx.body,
    }
    try:
        canonical = orjson.dumps(material, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return hashlib.sha256(canonical).hexdigest()
