"""The OpenAI Responses API (``POST /v1/responses``).

- :mod:`.types`: typed shapes of the request, its input items and the response object.
- :mod:`.request`: a Responses request as an OpenAI chat request (the translated lane).
- :mod:`.stream`: chat chunks as Responses stream events, ``response.created`` to
  ``response.completed``.
- :mod:`.unary`: a ``chat.completion`` as a Response object.
- :mod:`.errors`: errors before headers (OpenAI JSON) and after (``response.failed``).
- :mod:`.lane`: the translated lane's per-request state.
- :mod:`.store`: the conversation state the gateway keeps for translated lanes.
- :mod:`.http`: ``GET`` / ``DELETE /v1/responses/{id}`` and its input items.
- :mod:`.native`, :mod:`.upstream`, :mod:`.events`, :mod:`.forward`, :mod:`.views`: the
  native lane (its dialect and pinning, the adapters' view, the stream observer, GET and
  DELETE at the upstream, plugin views).
"""
