"""A hostile guest agent on a unix socket: the seam where tests put replies a real qemu-ga
cannot be made to send on demand (garbage, endless lines, wrong ids, silence)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

#: Given the parsed request, return what to send back: bytes, a list of chunks (a huge
#: answer without holding it all in memory), or None to stay silent.
Answer = bytes | list[bytes] | None
Behaviour = Callable[[dict[str, Any]], Answer]


def honest_sync(request: dict[str, Any]) -> bytes | None:
    """What qemu-ga sends for a guest-sync-delimited, or None for other requests."""
    if request.get("execute") == "guest-sync-delimited":
        return b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
    return None


def reply(request: dict[str, Any], value: Any) -> bytes:
    return json.dumps({"return": value, "id": request.get("id")}).encode() + b"\n"


@asynccontextmanager
async def fake_agent(path: Path, behaviour: Behaviour, *, sync: bool = True,
                     flood: list[bytes] | None = None) -> AsyncIterator[Path]:
    """Serve ``behaviour`` on ``path``. ``sync``: answer the handshake honestly first.
    ``flood``: bytes pushed to every client right after it connects."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for chunk in flood or []:
                writer.write(chunk)
                await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    request = json.loads(line.lstrip(b"\xff"))
                except ValueError:
                    continue
                answer: Answer = honest_sync(request) if sync else None
                if answer is None:
                    answer = behaviour(request)
                for chunk in [answer] if isinstance(answer, bytes) else answer or []:
                    writer.write(chunk)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield path
    finally:
        server.close()
        await server.wait_closed()
