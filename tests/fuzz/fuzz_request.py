"""Coverage-guided fuzzing of request handling with atheris (opt-in, not part of pytest).

    pip install atheris
    python tests/fuzz/fuzz_request.py -max_total_time=60        # libFuzzer flags
    python tests/fuzz/fuzz_request.py crash-<sha1>                # replay a finding

Each input is a request body as raw bytes (the endpoint and Content-Type are chosen from its
length). It runs the path the gateway runs before anything is sent upstream:
`read_json_body`, `validate_body`, the Anthropic dialect for /v1/messages, the request
translation of every upstream kind and the demo model. Any exception other than a 4xx
`GatewayError` is a crash (it would be a 500 and a traceback in the log).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

with atheris.instrument_imports():
    from gateway.context import Endpoint
    from gateway.errors import GatewayError
    from tests.unit.test_request_fuzz import assert_clean_refusal, read_body, run_pipeline

_CONTENT_TYPES = [*["application/json"] * 4, "application/json; charset=utf-8", "text/plain", None]
_ROUTES = [(endpoint, "openai") for endpoint in Endpoint] + [(Endpoint.CHAT, "anthropic")]
_LOOP = asyncio.new_event_loop()


def one_input(data: bytes) -> None:
    # The whole input is the body (so JSON seeds and the dictionary work as they are); the
    # endpoint and the Content-Type follow from its length.
    endpoint, client_format = _ROUTES[len(data) % len(_ROUTES)]
    content_type = _CONTENT_TYPES[len(data) % len(_CONTENT_TYPES)]
    try:
        body = _LOOP.run_until_complete(read_body(data, content_type))
    except GatewayError as err:
        assert_clean_refusal(err)
        return
    run_pipeline(endpoint, client_format, body, _LOOP.run_until_complete)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
