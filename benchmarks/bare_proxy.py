"""A bare aiohttp byte-passthrough reverse proxy: the performance floor for this stack.

    python -m benchmarks.bare_proxy --port 9100 --upstream http://127.0.0.1:9000

Every request except GET /readyz is forwarded (method, path, query, body and a few headers)
with one shared aiohttp ClientSession; the response status and Content-Type are copied and the
body is relayed chunk by chunk with `iter_any()` + `await resp.write()`. No parsing, no plugins,
no limits: anything a real gateway does costs more than this.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from benchmarks._runtime import raise_fd_limit, run

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
FORWARDED_HEADERS = ("Content-Type", "Authorization", "Accept")


async def readyz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    async with session.request(request.method, url, data=body, headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status)
        content_type = upstream.headers.get("Content-Type")
        if content_type is not None:
            response.headers["Content-Type"] = content_type
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client left; dropping the upstream closes it too
            pass
        return response


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{tail:.*}", proxy)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(make_app(upstream), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        print(f"bare proxy listening on http://{host}:{port} -> {upstream}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    args = parser.parse_args(argv)
    raise_fd_limit()
    run(serve(args.host, args.port, args.upstream), use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
