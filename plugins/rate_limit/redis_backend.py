"""The Redis backend of the rate limiter: limits shared by several replicas, one atomic
Lua script per call (``scripts/*.lua``, package data; see :mod:`plugins.rate_limit.limiter`
for the semantics and the keys)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from plugins.rate_limit.limiter import (
    BACKEND_RETRY_AFTER,
    Decision,
    Lease,
    Scope,
    _debit_due,
    _decide,
    _plan,
    _take_debit,
    _to_us,
)
from plugins.rate_limit.redis_pipe import PipelinedRedis, ReplyError, connect_params

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = logging.getLogger("sluice.ratelimit")


def _script(name: str) -> str:
    """The Lua script ``scripts/<name>.lua`` with ``scripts/common.lua`` in front."""
    scripts = files("plugins.rate_limit").joinpath("scripts")
    return scripts.joinpath("common.lua").read_text() + scripts.joinpath(f"{name}.lua").read_text()


class _BackendError(Exception):
    """Redis failed or did not answer in time (already counted and logged)."""


DEFAULT_TIMEOUT = 0.25  # seconds per Redis call: a loaded 2-core machine stays under it
# A release that failed is retried after these pauses (seconds), in a task the limiter
# holds and `close` awaits: a slot must not stay taken for the lease's whole TTL because
# Redis hiccuped once. A call that timed out may still have run (the mark makes a retry,
# or an admission that lands after its release, change nothing).
RELEASE_RETRIES = (0.1, 0.3, 1.0, 3.0)
FINISHED_MARK_MS = 120_000  # how long Redis remembers a finished lease
WARM_CONNECTIONS = 4  # connections opened at start-up, before the first request


class RedisRateLimiter:
    """Rate limits shared by several replicas through one Redis (atomic Lua scripts).

    Each admit, each debit that has to reach Redis and each finish is one EVALSHA
    (after the first load of a script on a server). Every call is bounded by
    ``timeout`` seconds; on failure the limiter admits (``fail_open``) or denies with
    kind "backend". ``failures`` counts failed calls, ``failing`` is the current state.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sluice:rl:",
        timeout: float = DEFAULT_TIMEOUT,
        fail_open: bool = True,
        lease_ttl: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.prefix = prefix
        self.timeout = timeout
        self.fail_open = fail_open
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.failures = 0
        self.failing = False
        self._redis: Redis = Redis.from_url(
            url,
            # calls are bounded by asyncio.timeout(self.timeout) (adjustable at run time);
            # the socket timeouts are only a backstop
            socket_timeout=max(1.0, timeout),
            socket_connect_timeout=max(1.0, timeout),
            # one immediate retry on a broken pooled connection (e.g. after a restart);
            # the whole call stays bounded by `timeout` below.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
        # The scripts go through one pipelined connection of our own (see gateway.redis_pipe)
        # when the URL is plain TCP; redis-py serves every other URL (TLS, Unix sockets).
        params = connect_params(url)
        self._pipe = PipelinedRedis(**params) if params is not None else None
        self._admit: AsyncScript = self._redis.register_script(_script("admit"))
        self._debit: AsyncScript = self._redis.register_script(_script("debit"))
        self._finish: AsyncScript = self._redis.register_script(_script("finish"))
        self._releases: set[asyncio.Task[None]] = set()  # finishes still being retried

    def _lease_key(self, lease_id: str) -> str:
        return f"{self.prefix}lease:{lease_id}"

    def _finished_key(self, lease_id: str) -> str:
        return f"{self.prefix}done:{lease_id}"

    async def start(self, within: float = 10.0) -> bool:
        """Connect and load the scripts before the first request (call it before ready).

        Waits up to ``within`` seconds; if Redis cannot be reached by then, logs it and
        returns False (requests then fail open or closed as configured).
        """
        from redis.exceptions import RedisError

        pipe = self._pipe
        try:
            async with asyncio.timeout(within):
                if pipe is not None:
                    await pipe.call("PING")
                    for script in (self._admit, self._debit, self._finish):
                        await pipe.call("SCRIPT LOAD", script.script)
                else:
                    await asyncio.gather(*(self._redis.ping() for _ in range(WARM_CONNECTIONS)))
                    for script in (self._admit, self._debit, self._finish):
                        await self._redis.script_load(script.script)
        except (RedisError, ReplyError, OSError, TimeoutError) as exc:
            self.failing = True
            log.warning(
                "rate-limit backend not reachable at start-up (%s); failing %s until it is",
                type(exc).__name__,
                "open" if self.fail_open else "closed",
            )
            return False
        return True

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(self.timeout):
                if self._pipe is not None:
                    result = await self._evalsha(self._pipe, script, keys, args)
                else:
                    result = await script(keys=keys, args=args)
        except (RedisError, ReplyError, OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and self._pipe is not None:
                self._pipe.abort()  # a reply that never comes must not go to the next caller
            self.failures += 1
            if not self.failing:
                self.failing = True
                log.warning(
                    "rate-limit backend failing (%s: %s); failing %s until it recovers",
                    type(exc).__name__,
                    exc,
                    "open" if self.fail_open else "closed",
                )
            raise _BackendError from exc
        if self.failing:
            self.failing = False
            log.info("rate-limit backend recovered (%d failed calls so far)", self.failures)
        return result

    @staticmethod
    async def _evalsha(
        pipe: PipelinedRedis, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        """EVALSHA; the script is loaded again first if the server lost it (a restart)."""
        try:
            return await pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except ReplyError as err:
            if not str(err).startswith("NOSCRIPT"):
                raise
        await pipe.call("SCRIPT LOAD", script.script)
        return await pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def admit(
        self, scopes: Sequence[Scope], tokens: int, now: float | None = None
    ) -> Decision:
        """Check and take all limits of all scopes in one EVALSHA, all-or-nothing."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        t = self.clock() if now is None else now
        unique, checks = _plan(scopes, tokens, t)
        lease = Lease(uuid.uuid4().hex, unique, tokens, tuple(checks), tokens, renewed_at=t)
        if not checks:
            return Decision(True, None, None, 0.0, {}, lease)
        keys = [self._lease_key(lease.id)] + [self.prefix + c.key for c in checks]
        keys.append(self._finished_key(lease.id))
        args: list[Any] = [_to_us(t), lease.id, _to_us(self.lease_ttl), len(checks)]
        for c in checks:
            args += [c.code, c.limit, c.cost, c.arg]
        # Whether the script ran is unknown when the call fails or is cancelled (a reply
        # that came too late): the lease is then degraded, and finished here unless it is
        # handed to the caller (fail open), so a slot Redis did take is given back.
        lease.degraded = True
        try:
            raw = await self._run(self._admit, keys, args)
        except _BackendError:
            if self.fail_open:
                return Decision(True, None, None, 0.0, {}, lease)
            self._release(lease, 0)
            return Decision(False, "backend", None, BACKEND_RETRY_AFTER, {}, None)
        except asyncio.CancelledError:
            self._release(lease, 0)
            raise
        lease.degraded = False
        values = [int(v) for v in raw]
        if len(values) == 1:  # already finished: cannot happen to a caller still waiting
            return Decision(False, "backend", None, BACKEND_RETRY_AFTER, {}, None)
        results = [
            (values[1 + 4 * i], values[2 + 4 * i], values[3 + 4 * i], values[4 + 4 * i])
            for i in range(len(checks))
        ]
        ok = values[0] == 1
        return _decide(ok, checks, results, lease if ok else None)

    async def debit(self, lease: Lease, tokens: int) -> bool:
        """Count streamed tokens; charge those past the reservation; False if a budget is out.

        Reaches Redis only when there is an excess to charge, the lease has a budget to
        check, or its concurrency slot is due for renewal (a third of ``lease_ttl``): call
        it every few hundred tokens or seconds, not per token. On backend failure returns
        True (a stream is not cut for an outage).
        """
        extra, t = _take_debit(lease, tokens), self.clock()
        if not _debit_due(lease, extra, t, self.lease_ttl):
            return True
        checks = lease.reconciled
        keys = [self._lease_key(lease.id)] + [self.prefix + c.key for c in checks]
        args: list[Any] = [_to_us(t), lease.id, _to_us(self.lease_ttl), extra, len(checks)]
        for c in checks:
            args += [c.code, c.limit, c.arg]
        try:
            raw = await self._run(self._debit, keys, args)
        except _BackendError:
            return True
        lease.charged += extra
        lease.renewed_at = t
        return int(raw) == 1

    async def finish(self, lease: Lease, actual_tokens: int) -> None:
        """Reconcile and release in one EVALSHA; idempotent; never raises.

        Waits for the first attempt only (bounded by ``timeout``); a failed one is retried
        in the background (``RELEASE_RETRIES``), and cancelling the caller does not stop it.
        """
        first = self._release(lease, actual_tokens)
        if first is not None:
            await first.wait()

    def _release(self, lease: Lease, actual_tokens: int) -> asyncio.Event | None:
        """Start finishing ``lease`` in a held task; the event is set after the first try."""
        if lease.finished:
            return None
        lease.finished = True
        checks = lease.reconciled
        if not checks:
            return None
        keys = [self._lease_key(lease.id)] + [self.prefix + c.key for c in checks]
        keys.append(self._finished_key(lease.id))
        args: list[Any] = [
            _to_us(self.clock()),
            lease.id,
            int(lease.degraded),
            max(0, actual_tokens),
            lease.charged,
            len(checks),
            FINISHED_MARK_MS,
        ]
        for c in checks:
            args += [c.code, c.limit, c.arg]
        tried = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._releasing(keys, args, tried))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return tried

    async def _releasing(self, keys: list[str], args: list[Any], tried: asyncio.Event) -> None:
        try:
            for pause in (0.0, *RELEASE_RETRIES):
                if pause:
                    await asyncio.sleep(pause)
                try:
                    await self._run(self._finish, keys, args)
                    return
                except _BackendError:
                    pass  # counted and logged
                finally:
                    tried.set()
            log.warning(
                "rate-limit release failed %d times; the slot comes back when its lease expires",
                1 + len(RELEASE_RETRIES),
            )
        except Exception:  # never raise from a release
            self.failures += 1
            log.exception("rate-limit finish failed")
        finally:
            tried.set()

    async def close(self) -> None:
        """Let releases still being retried finish (bounded), then close the connections."""
        if self._releases:
            bound = sum(RELEASE_RETRIES) + (1 + len(RELEASE_RETRIES)) * self.timeout + 1.0
            _done, pending = await asyncio.wait(set(self._releases), timeout=bound)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._pipe is not None:
            await self._pipe.close()
        await self._redis.aclose()
