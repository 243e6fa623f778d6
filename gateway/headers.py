"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

from collections.abc import Mapping

# RFC 9110 §7.6.1 hop-by-hop headers, plus ones the gateway always sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: client credentials, framing, and what the gateway decides.
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "accept-encoding",
    "authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "x-request-id",
    "expect",
    # Client-supplied forwarding headers: spoofable, and they would tell a provider the
    # end user's address and the internal topology. (Also every `x-forwarded-*`.)
    "forwarded",
    "x-real-ip",
}


REQUEST_ID_HEADER = "X-Request-Id"


def gateway_owned(name: str) -> bool:
    """Whether the gateway decides header `name` itself (framing, credentials, forwarding),
    so that it cannot carry the request id upstream."""
    low = name.lower()
    return low != "x-request-id" and (low in _NOT_FORWARDED or low.startswith("x-forwarded-"))


def upstream_headers(
    client: Mapping[str, str], request_id: str, id_header: str | None = REQUEST_ID_HEADER
) -> dict[str, str]:
    """Headers to send upstream: the client's end-to-end headers minus credentials and
    forwarding headers (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`), plus `request_id` in
    `id_header` (none when it is None; the client's own `X-Request-Id` is never passed on).

    Headers named in the client's `Connection` header are hop-by-hop too and dropped.
    """
    listed = {
        token.strip().lower()
        for value in _all(client, "connection")
        for token in value.split(",")
        if token.strip()
    }
    if id_header is not None:
        listed.add(id_header.lower())
    out = {
        name: value
        for name, value in client.items()
        if (low := name.lower()) not in _NOT_FORWARDED
        and low not in listed
        and not low.startswith("x-forwarded-")
    }
    if id_header is not None:
        out[id_header] = request_id
    out["Content-Type"] = "application/json"
    return out


def merge_headers(
    client: Mapping[str, str], configured: Mapping[str, str], client_wins: frozenset[str]
) -> dict[str, str]:
    """The client's (filtered) headers overlaid with the configured ones, except that for
    the lower-case names in `client_wins` a client's value is kept. Names compare
    case-insensitively, so no header goes out twice."""
    sent = {name.lower() for name in client}
    out = {
        name: value
        for name, value in configured.items()
        if not (name.lower() in client_wins and name.lower() in sent)
    }
    taken = {name.lower() for name in out}
    out.update((name, value) for name, value in client.items() if name.lower() not in taken)
    return out


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    return [value for key, value in headers.items() if key.lower() == name]


SSE_RESPONSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
