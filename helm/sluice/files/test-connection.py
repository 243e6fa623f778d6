"""`helm test`: the gateway answers through its Service (run by the image's own Python).

Checks GET /readyz, GET /v1/models and, unless SLUICE_TEST_COMPLETION is 0, one streamed
chat completion. Configured by SLUICE_TEST_URL, SLUICE_TEST_MODEL (empty: the first model
listed), SLUICE_TEST_API_KEY (empty: no key; a 401 from /v1/models then ends the test).
Standard library only; prints what it checked, exits 1 on the first failure.
"""

import json
import os
import sys
import urllib.error
import urllib.request
from typing import NoReturn

TIMEOUT = 30.0


def fail(message: str) -> NoReturn:
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def call(url: str, key: str, body: object = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, or of a POST of `body` as JSON."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get_content_type(), err.read()
    except OSError as err:
        fail(f"{url}: {err}")


def check_stream(text: str) -> str:
    """The completion text of an OpenAI SSE stream; fails on an error event or no [DONE]."""
    content = []
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        fail(f"the stream did not end with data: [DONE]: {text[-300:]!r}")
    for event in events[:-1]:
        chunk = json.loads(event)
        if "error" in chunk:
            fail(f"the stream ended with an error event: {event}")
        for choice in chunk.get("choices", []):
            content.append((choice.get("delta") or {}).get("content") or "")
    return "".join(content)


def main() -> None:
    base = os.environ["SLUICE_TEST_URL"].rstrip("/")
    key = os.environ.get("SLUICE_TEST_API_KEY", "")
    status, _, body = call(f"{base}/readyz", "")
    if status != 200:
        fail(f"GET /readyz answered {status}: {body[:300]!r}")
    print(f"ok: GET {base}/readyz 200", flush=True)

    status, kind, body = call(f"{base}/v1/models", key)
    if status == 401 and not key:
        if kind != "application/json" or "error" not in json.loads(body):
            fail(f"GET /v1/models answered 401 without an OpenAI error: {body[:300]!r}")
        print("ok: GET /v1/models 401: the gateway needs a key (set tests.apiKeySecret", flush=True)
        print("    to also check the models and a chat completion)", flush=True)
        return
    if status != 200 or kind != "application/json":
        fail(f"GET /v1/models answered {status} {kind}: {body[:300]!r}")
    models = [item["id"] for item in json.loads(body)["data"]]
    model = os.environ.get("SLUICE_TEST_MODEL") or (models[0] if models else "")
    if not model:
        fail("GET /v1/models lists no model")
    print(f"ok: GET /v1/models 200 {models}", flush=True)
    if os.environ.get("SLUICE_TEST_COMPLETION", "1") == "0":
        return

    request = {
        "model": model,
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    status, kind, body = call(f"{base}/v1/chat/completions", key, request)
    if status != 200 or kind != "text/event-stream":
        fail(f"POST /v1/chat/completions ({model}) answered {status} {kind}: {body[:300]!r}")
    text = check_stream(body.decode())
    print(f"ok: POST /v1/chat/completions {model} streamed {text!r}", flush=True)


if __name__ == "__main__":
    main()
