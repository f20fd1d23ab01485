"""Running the host's tools for the lab (mkfs, qemu-img, ldd, initdb, ...): a failure is a
LabError that names the step and says what the tool said."""

from __future__ import annotations

import subprocess

from freezeframe.errors import LabError


def run(argv: list[str], what: str, *, timeout: float | None = None) -> str:
    """Run ``argv`` to do ``what``; returns its standard output."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except OSError as err:
        raise LabError(f"cannot run {argv[0]} to {what}: {err.strerror}",
                       hint="run make setup to install the lab's packages") from err
    except subprocess.TimeoutExpired as err:
        raise LabError(f"{what} did not finish within {timeout:g}s") from err
    if done.returncode != 0:
        raise LabError(f"{what} failed: {(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout
