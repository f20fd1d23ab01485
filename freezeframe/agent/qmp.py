"""A thin adapter over ``qemu.qmp``: connect with a deadline, run commands with a
deadline, wait for events, and turn the library's exceptions into HypervisorError once,
here. No policy: what to run and when belongs to ``targets/qemu.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from freezeframe.agent import holders
from freezeframe.errors import HypervisorError, MonitorCommandError

DEFAULT_TIMEOUT = 30.0


class Monitor:
    """One QMP session with one QEMU process."""

    def __init__(self, socket_path: str | Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._client = QMPClient("freezeframe")

    async def __aenter__(self) -> Monitor:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if not Path(self.socket_path).exists():
            raise HypervisorError(
                f"no QMP socket at {self.socket_path}",
                hint="check the instance's --qmp path and that the VM is running",
            )
        try:
            await asyncio.wait_for(self._client.connect(self.socket_path), self.timeout)
        except TimeoutError as err:
            await self._raise_if_held(err)
            raise HypervisorError(f"QMP at {self.socket_path} did not answer within {self.timeout:g}s",
                                  hint="is QEMU hung? (it accepted the connection but sent no greeting)") from err
        except (ConnectError, QMPError, OSError) as err:
            await self._raise_if_held(err)
            raise HypervisorError(
                f"cannot connect to QMP at {self.socket_path}: {err}",
                hint="is the VM running, and is no other client holding its QMP socket?",
            ) from err

    async def _raise_if_held(self, err: BaseException) -> None:
        """A connection queued behind another client never gets a greeting: say so."""
        found = await asyncio.to_thread(holders.held, self.socket_path)
        if found is not None:
            raise HypervisorError(found.describe("QMP"), hint=found.hint) from err

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError):
            await self._client.disconnect()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      *, timeout: float | None = None) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), limit)
        except ExecuteError as err:
            raise MonitorCommandError(command, err.error_class, err.error.error.desc) from err
        except TimeoutError as err:
            raise HypervisorError(f"QMP {command} got no reply within {limit:g}s") from err
        except (QMPError, OSError) as err:
            raise HypervisorError(f"QMP {command} failed: {err}") from err

    @contextlib.asynccontextmanager
    async def events(self, *names: str) -> AsyncIterator[Callable[[float], Any]]:
        """Listen for events named ``names``; yields ``next_event(timeout) -> event dict``.

        Start listening before issuing the command whose events you want, so none is missed.
        """
        listener = EventListener(names=list(names))
        with self._client.listen(listener):

            async def next_event(timeout: float) -> dict[str, Any]:
                try:
                    event = await asyncio.wait_for(listener.get(), timeout)
                except TimeoutError as err:
                    raise HypervisorError(f"no {'/'.join(names)} event from QEMU within {timeout:g}s") from err
                return dict(event)

            yield next_event
