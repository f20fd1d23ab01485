"""User scripts as writers: a pre-freeze command and a post-thaw command.

Each runs in its own process group, so a timeout kills it and everything it started. A
non-zero exit fails the writer. Output is kept, bounded, in the manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from freezeframe.writers.base import Option, Writer, WriterError, bounded


class ScriptWriter(Writer):
    kind = "script"
    summary = "run a command before the freeze and another after the thaw"
    options: ClassVar[Mapping[str, Option]] = {
        "pre_freeze": Option("command run just before the freeze (exit 0 = quiesced)"),
        "post_thaw": Option("command run after the thaw"),
        "env": Option("extra environment, as NAME=VALUE,NAME=VALUE"),
        "cwd": Option("working directory"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._process: asyncio.subprocess.Process | None = None

    async def check(self) -> str:
        found = []
        for key in ("pre_freeze", "post_thaw"):
            command = self.option(key)
            if command:
                program = shlex.split(command)[0]
                path = shutil.which(program, path=None if "/" not in program else "")
                if path is None and not (os.path.isfile(program) and os.access(program, os.X_OK)):
                    raise WriterError(f"{key}: {program} is not an executable program")
                found.append(f"{key}: {program}")
        return ", ".join(found) or "no commands set"

    async def freeze(self) -> None:
        command = self.option("pre_freeze")
        if command:
            self.record["pre_freeze"] = await self._run(command)

    async def thaw(self) -> None:
        command = self.option("post_thaw")
        if command:
            self.record["post_thaw"] = await self._run(command)

    async def abort(self) -> None:
        self._kill()
        # A script that quiesced something must still get its chance to undo it.
        command = self.option("post_thaw")
        if command and "pre_freeze" in self.record and "post_thaw" not in self.record:
            try:
                self.record["post_thaw"] = await asyncio.wait_for(self._run(command), self.spec.timeout)
            except (WriterError, TimeoutError) as err:
                self.record["post_thaw"] = {"error": str(err)}
                self._kill()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for pair in filter(None, (self.option("env") or "").split(",")):
            key, sep, value = pair.partition("=")
            if not sep:
                raise WriterError(f"env entry {pair!r} is not NAME=VALUE")
            env[key.strip()] = value
        env["FREEZEFRAME_WRITER"] = self.name
        return env

    async def _run(self, command: str) -> dict[str, Any]:
        argv = shlex.split(command)
        start = time.monotonic()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, env=self._environment(), cwd=self.option("cwd"),
                start_new_session=True,
            )
        except OSError as err:
            raise WriterError(f"cannot run {argv[0]}: {err.strerror}") from err
        try:
            output, _ = await self._process.communicate()
        except BaseException:
            self._kill()  # cancelled by the runner's timeout
            raise
        result: dict[str, Any] = {"command": command, "exit_code": self._process.returncode,
                  "duration_ms": round((time.monotonic() - start) * 1000, 1),
                  "output": bounded(output.decode(errors="replace"))}
        self._process = None
        if result["exit_code"] != 0:
            raise WriterError(f"{argv[0]} exited with {result['exit_code']}: {result['output'][-200:].strip()}")
        return result

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
