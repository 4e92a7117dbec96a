"""The baseline for bench_idle.py: a minimal plain aiohttp WebSocket echo server.

No gate, no authentication, no JSON-RPC: one handler that upgrades (same
subprotocol, message size limit, heartbeat and no compression as wardgate) and
echoes every message back. It runs on uvloop when wardgate would, so the two
differ only in what wardgate adds per connection. Prints the same
``listening on http://127.0.0.1:PORT`` line as ``wardgate serve``.

    .venv/bin/python bench/baseline_ws_server.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import WSMsgType, web

HEARTBEAT = 20.0  # wardgate's limits.heartbeat default
MAX_MESSAGE_BYTES = 1024 * 1024  # wardgate's limits.max_message_bytes default


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(
        protocols=("wardgate.v1",), max_msg_size=MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT, compress=False
    )
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"baseline listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
