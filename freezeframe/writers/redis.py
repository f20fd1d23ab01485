"""Redis: pause writes, complete a save, hold the pause across the freeze.

``CLIENT PAUSE ... WRITE`` makes the server hold every write command (reads go on) while a
``BGSAVE`` writes the dataset; when the save has completed, the RDB on disk holds every
write acknowledged before the pause, and the file-system freeze captures it. The pause has
its own deadline in the server, so even a writer that dies mid-way cannot leave Redis
paused; ``thaw`` and ``abort`` unpause at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import redis.asyncio as aioredis
import redis.exceptions

from freezeframe.writers.base import CREDENTIAL_OPTIONS, Option, Writer, WriterError, password


class RedisWriter(Writer):
    kind = "redis"
    summary = "CLIENT PAUSE WRITE, then a completed BGSAVE, held across the freeze"
    options: ClassVar[Mapping[str, Option]] = {
        "unix_socket": Option("server socket (used instead of host/port when set)"),
        "host": Option("host", default="127.0.0.1"),
        "port": Option("port", default="6379"),
        "username": Option("ACL user"),
        "connect_timeout": Option("seconds", default="5"),
        **CREDENTIAL_OPTIONS,
    }

    _client: aioredis.Redis | None = None

    async def _connect(self) -> aioredis.Redis:
        if self._client is None:
            timeout = float(self.required("connect_timeout"))
            common: dict[str, Any] = {"password": password(self), "username": self.option("username"),
                                      "socket_connect_timeout": timeout, "decode_responses": True}
            if self.option("unix_socket"):
                self._client = aioredis.Redis(unix_socket_path=self.option("unix_socket"), **common)
            else:
                self._client = aioredis.Redis(host=self.required("host"), port=int(self.required("port")), **common)
        return self._client

    async def _run(self, *command: str) -> Any:
        client = await self._connect()
        try:
            return await client.execute_command(*command)
        except redis.exceptions.RedisError as err:
            raise WriterError(f"Redis: {command[0]} failed: {err}") from err

    async def _persistence(self) -> dict[str, Any]:
        client = await self._connect()
        try:
            return dict(await client.info("persistence"))
        except redis.exceptions.RedisError as err:
            raise WriterError(f"Redis: INFO failed: {err}") from err

    async def check(self) -> str:
        try:
            await self._run("PING")
            info = await self._persistence()
            acl = await self._acl()
        finally:
            await self._close()
        return f"Redis answers; last background save: {info.get('rdb_last_bgsave_status')}; {acl}"

    async def _acl(self) -> str:
        """Whether this user may run every command the writer sends, asked with ACL DRYRUN
        (Redis 7), which changes nothing. A user that may not ask is told what it needs."""
        user = self.option("username") or "default"
        needs = " ".join(name for name, _ in _COMMANDS)
        denied = []
        client = await self._connect()
        for name, command in _COMMANDS:
            try:
                answer = await client.execute_command("ACL", "DRYRUN", user, *command)
            except redis.exceptions.ResponseError as err:
                if "dryrun" in str(err).lower() or "unknown" in str(err).lower():
                    return f"its ACL could not be checked ({err}); the writer needs: {needs}"
                raise WriterError(f"Redis: ACL DRYRUN failed: {err}") from err
            except redis.exceptions.RedisError as err:
                raise WriterError(f"Redis: ACL DRYRUN failed: {err}") from err
            if answer != "OK":
                denied.append(name)
        if denied:
            raise WriterError(f"Redis: user {user} may not run {' '.join(denied)}, which the writer needs; as an "
                              f"administrator, run: ACL SETUSER {user} {' '.join(denied)}")
        return f"user {user} may run every command the writer sends"

    async def prepare(self) -> None:
        info = await self._persistence()
        directory = (await self._run("CONFIG", "GET", "dir"))
        filename = (await self._run("CONFIG", "GET", "dbfilename"))
        self.record["rdb"] = f"{_config_value(directory)}/{_config_value(filename)}"
        self.record["server_version"] = (await (await self._connect()).info("server")).get("redis_version")
        if info.get("rdb_last_bgsave_status") != "ok":
            raise WriterError("Redis reports its last background save failed; fix persistence first")

    async def freeze(self) -> None:
        # The server lifts the pause by itself after this, should we never come back.
        pause_ms = int((self.spec.timeout * 2 + 10) * 1000)
        await self._run("CLIENT", "PAUSE", str(pause_ms), "WRITE")
        self.record["paused"] = True
        before = (await self._persistence()).get("rdb_last_save_time")
        start = time.monotonic()
        try:
            await self._run("BGSAVE")
        except WriterError as err:
            if "in progress" not in str(err):
                raise
        while True:
            info = await self._persistence()
            if not int(info.get("rdb_bgsave_in_progress", 0)) and info.get("rdb_last_save_time") != before:
                break
            await asyncio.sleep(0.01)
        if info.get("rdb_last_bgsave_status") != "ok":
            raise WriterError("Redis: the background save failed")
        self.record["save"] = {"last_save_time": info.get("rdb_last_save_time"),
                               "duration_ms": round((time.monotonic() - start) * 1000, 1)}

    async def thaw(self) -> None:
        await self._run("CLIENT", "UNPAUSE")
        await self._close()

    async def abort(self) -> None:
        try:
            if self._client is not None:
                await asyncio.wait_for(self._client.execute_command("CLIENT", "UNPAUSE"), 5)
        except (redis.exceptions.RedisError, TimeoutError, OSError):
            pass  # the server's own pause deadline still lifts it
        await self._close()

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


#: What the writer sends, as ACL names it and with arguments ACL DRYRUN checks without running.
_COMMANDS = (("+ping", ("PING",)), ("+info", ("INFO", "persistence")), ("+config|get", ("CONFIG", "GET", "dir")),
             ("+client|pause", ("CLIENT", "PAUSE", "1", "WRITE")), ("+client|unpause", ("CLIENT", "UNPAUSE")),
             ("+bgsave", ("BGSAVE",)))


def _config_value(reply: Any) -> str:
    if isinstance(reply, list) and len(reply) == 2:
        return str(reply[1])
    if isinstance(reply, dict) and len(reply) == 1:
        return str(next(iter(reply.values())))
    raise WriterError(f"Redis: unexpected CONFIG GET reply {reply!r}")
