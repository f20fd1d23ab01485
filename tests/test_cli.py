"""The command line as a user meets it: output formats, errors, exit codes."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import run_cli, unique

from freezeframe.config import Home


@pytest.fixture
def cli_home(tmp_path: Path) -> Home:
    return Home.open(tmp_path / "home")


def test_help_documents_commands_and_exit_codes(cli_home: Home) -> None:
    done = run_cli(cli_home, "--help")
    assert done.returncode == 0
    for word in ("snapshot", "instance", "template", "lab", "Exit codes", "policy said fail"):
        assert word in done.stdout
    create = run_cli(cli_home, "snapshot", "create", "--help")
    for option in ("--consistency", "--on-failure", "--agent-timeout", "--freeze-timeout", "--output"):
        assert option in create.stdout
    # Groups load when used: each one listed must load and explain itself.
    listed = done.stdout.split("Commands:", 1)[1].split("Exit codes", 1)[0]
    groups = [line.split()[0] for line in listed.splitlines() if line.startswith("  ") and line.split()]
    assert {"snapshot", "backup", "repo", "writer", "instance", "template", "lab"} <= set(groups)
    for group in groups:
        shown = run_cli(cli_home, group, "--help")
        assert shown.returncode == 0, shown.stderr
        assert f"freezeframe {group} [OPTIONS]" in shown.stdout, group
        assert ("Commands:" in shown.stdout) == (group != "daemon"), group
    unknown = run_cli(cli_home, "snapshots")
    assert unknown.returncode == 2
    assert "No such command 'snapshots'" in unknown.stderr


def test_templates_and_instances_through_the_cli(cli_home: Home, tmp_path: Path) -> None:
    assert run_cli(cli_home, "template", "add", "db", "--application-consistent-snapshot-enabled").returncode == 0
    added = run_cli(cli_home, "instance", "add", "pg1", "--qmp", str(tmp_path / "q.sock"), "--qga",
                    str(tmp_path / "g.sock"), "--template", "db", "-o", "json")
    assert added.returncode == 0, added.stderr
    record = json.loads(added.stdout)
    assert record["application_consistent_snapshot_enabled"] is True
    assert record["application_consistent_snapshot_source"] == "template"
    assert record["qmp_socket"] == str(tmp_path / "q.sock")

    run_cli(cli_home, "instance", "update", "pg1", "--no-application-consistent-snapshot-enabled")
    shown = json.loads(run_cli(cli_home, "instance", "show", "pg1", "-o", "json").stdout)
    assert (shown["application_consistent_snapshot_enabled"], shown["application_consistent_snapshot_source"]) \
        == (False, "instance")

    listed = json.loads(run_cli(cli_home, "instance", "list", "-o", "json").stdout)
    assert [i["name"] for i in listed] == ["pg1"]
    table = run_cli(cli_home, "template", "list")
    assert "db" in table.stdout
    assert "yes" in table.stdout

    busy = run_cli(cli_home, "template", "remove", "db")
    assert busy.returncode == 4
    assert "used by pg1" in busy.stderr
    assert run_cli(cli_home, "instance", "remove", "pg1").returncode == 0
    assert run_cli(cli_home, "template", "remove", "db").returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["snapshot", "create", "ghost"], 3, "no instance named 'ghost'"),
        (["snapshot", "show", "nothing"], 3, "no snapshot 'nothing'"),
        (["instance", "add", "bad name", "--qmp", "/q"], 2, "invalid instance name"),
        (["instance", "show", "ghost"], 3, "hint: see: freezeframe instance list"),
        (["snapshot", "create", "x", "--consistency", "perfect"], 2, "Invalid value for '--consistency'"),
        (["lab", "down", "ghost"], 3, "no lab VM named 'ghost'"),
        (["instance", "update", "ghost"], 2, "nothing to change"),
    ],
)
def test_errors_name_the_problem_and_exit_with_their_code(cli_home: Home, args: list[str], code: int,
                                                          message: str) -> None:
    done = run_cli(cli_home, *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_snapshot_of_a_vm_that_is_not_there_fails_cleanly_and_keeps_a_record(cli_home: Home,
                                                                               tmp_path: Path) -> None:
    name = unique("gone")
    run_cli(cli_home, "instance", "add", name, "--qmp", str(tmp_path / "missing.sock"))
    done = run_cli(cli_home, "snapshot", "create", name, "-o", "json")
    assert done.returncode == 7
    assert "no QMP socket at" in done.stderr
    assert "hint:" in done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "failed"
    assert "no QMP socket" in record["error"]


def test_snapshot_of_a_dead_qmp_socket_fails_with_a_clear_error(cli_home: Home, tmp_path: Path) -> None:
    # A socket file whose QEMU has gone: nothing listens.
    path = tmp_path / "dead.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()
    run_cli(cli_home, "instance", "add", "dead", "--qmp", str(path))
    done = run_cli(cli_home, "snapshot", "create", "dead", "--agent-timeout", "1")
    assert done.returncode == 7
    assert "cannot connect to QMP" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_timeouts_are_refused_before_anything_runs(cli_home: Home, tmp_path: Path) -> None:
    run_cli(cli_home, "instance", "add", "vm", "--qmp", str(tmp_path / "q.sock"))
    done = run_cli(cli_home, "snapshot", "create", "vm", "--agent-timeout", "0")
    assert done.returncode == 2
    assert "agent-timeout must be between 0 and 3600 seconds" in done.stderr
    assert json.loads(run_cli(cli_home, "snapshot", "list", "-o", "json").stdout) == []


def test_writers_from_the_config_file_are_listed_checked_and_protected(cli_home: Home, tmp_path: Path) -> None:
    run_cli(cli_home, "instance", "add", "db1", "--qmp", str(tmp_path / "q.sock"))
    assert run_cli(cli_home, "writer", "add", "db1", "sqlite", "--option", "path=/srv/a.db").returncode == 0
    config = cli_home.root / "config.toml"
    config.write_text('[instances.db1.writers.pg]\nkind = "postgresql"\ntimeout = 12\n'
                      'on_failure = "continue"\noptions = { port = "5433" }\n')
    listed = json.loads(run_cli(cli_home, "writer", "list", "db1", "-o", "json").stdout)
    assert [(w["name"], w["kind"], w["source"]) for w in listed] == [
        ("sqlite", "sqlite", "catalog"), ("pg", "postgresql", str(config))]
    assert listed[1]["timeout"] == 12.0
    assert listed[1]["on_failure"] == "continue"

    refused = run_cli(cli_home, "writer", "remove", "db1", "pg")
    assert refused.returncode == 2
    assert "declared in" in refused.stderr

    config.write_text('[instances.db1.writers.pg]\nkind = "postgresql"\noptions = { password = "x" }\n')
    bad = run_cli(cli_home, "writer", "list", "db1")
    assert bad.returncode == 2
    assert "passwords are never stored" in bad.stderr
    config.write_text('[instances.db1.writers.pg]\nkind = "oracle"\n')
    bad = run_cli(cli_home, "writer", "list", "db1")
    assert bad.returncode == 2
    assert "unknown writer kind 'oracle'" in bad.stderr
    config.write_text("[instances.db1.writers.pg\n")
    bad = run_cli(cli_home, "writer", "list", "db1")
    assert bad.returncode == 2
    assert "cannot read the config file" in bad.stderr
