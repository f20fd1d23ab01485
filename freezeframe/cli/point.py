"""The options of a consistent point, shared by ``snapshot create`` and ``backup create``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from freezeframe.cli.context import App
from freezeframe.engine.plan import SnapshotPlan, plan_snapshot
from freezeframe.model import Level, OnFailure


def point_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--consistency", type=click.Choice([lv.value for lv in Level]),
                     help="Level to ask for. Default: application if the instance has application-consistent "
                          "snapshots enabled, else crash."),
        click.option("--on-failure", type=click.Choice([f.value for f in OnFailure]), default="fallback",
                     show_default=True,
                     help="fallback: step down (application -> filesystem -> crash) and record why; "
                          "fail: keep nothing, only a failed record with the reason."),
        click.option("--agent-timeout", type=float, default=3.0, show_default=True,
                     help="Seconds the guest agent gets to answer the first probe (an absent agent costs this)."),
        click.option("--freeze-timeout", type=float, default=10.0, show_default=True,
                     help="Seconds the file-system freeze may take (in a VM it runs the guest's freeze hooks)."),
        click.option("--freeze-budget", type=click.FloatRange(0.1, 3600),
                     help="The longest the instance may stay frozen: past it, it is thawed at once and the "
                          "point steps down (or fails, with --on-failure fail). Default: the instance's, else 10 s."),
        click.option("--writer", "include", multiple=True, metavar="NAME",
                     help="Quiesce only these writers (repeatable). Default: all of the instance's writers."),
        click.option("--exclude-writer", "exclude", multiple=True, metavar="NAME",
                     help="Leave this writer out (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def plan_point(app: App, instance: str, *, name: str | None, consistency: str | None, on_failure: str,
               agent_timeout: float, freeze_timeout: float, freeze_budget: float | None,
               include: tuple[str, ...], exclude: tuple[str, ...], snapshot_id: str | None = None) -> SnapshotPlan:
    inst = app.catalog.instance(instance)
    return plan_snapshot(
        inst,
        now=datetime.now(UTC),
        name=name,
        level=Level.parse(consistency) if consistency else None,
        on_failure=OnFailure(on_failure),
        agent_timeout=agent_timeout,
        freeze_timeout=freeze_timeout,
        freeze_budget=freeze_budget,
        writers=app.writers(inst.name),
        include=include,
        exclude=exclude,
        snapshot_id=snapshot_id,
    )
