"""Database servers in the lab guest: PostgreSQL and MariaDB, run from the host's own
packages.

The guest image stays small (busybox and qemu-ga): a VM with a database application gets
the host's ``/usr`` shared read-only over 9p and runs the server binaries from there. The
data directory is made on the host (``initdb``, ``mariadb-install-db``: seconds here,
minutes under TCG) and written into the first data disk when it is formatted, owned as on
the host. The server listens on the guest's user-mode network, and QEMU forwards a port
on 127.0.0.1 to it, so freezeframe's writers reach it the way they reach a database in
any VM: over TCP.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from freezeframe.errors import LabError
from freezeframe.lab import host_tools

#: The applications that run a database server in the guest, and the port each listens on there.
DATABASES = {"postgresql": 5432, "mariadb": 3306}
#: Where each keeps its data on the first data disk (/mnt/ffdata0 in the guest).
DATA_DIRS = {"postgresql": "pg", "mariadb": "mysql"}
#: The account the lab's MariaDB lets in from the host (no password; the port is on 127.0.0.1 only).
MARIADB_USER = "ff"
PG_ROOT = Path("/usr/lib/postgresql")


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (QEMU binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def pg_major() -> str:
    """The newest PostgreSQL server installed on the host."""
    versions = sorted((p.name for p in PG_ROOT.glob("*") if (p / "bin" / "postgres").exists()), key=int)
    if not versions:
        raise LabError("no PostgreSQL server is installed on this host", hint="run make setup")
    return versions[-1]


def populate(app: str, root: Path) -> None:
    """Make ``app``'s data directory (and what it needs beside it) under ``root``, the
    future root of the first data disk."""
    data = root / DATA_DIRS[app]
    if app == "postgresql":
        # initdb runs as postgres; the guest runs the server as the same uid.
        root.chmod(0o755)
        data.mkdir(mode=0o700)
        shutil.chown(data, "postgres", "postgres")
        initdb = PG_ROOT / pg_major() / "bin" / "initdb"
        # Locale C: the guest has no locale files. Trust: the port is on 127.0.0.1 only.
        host_tools.run(["runuser", "-u", "postgres", "--", str(initdb), "-D", str(data), "-A", "trust", "--locale=C",
              "-E", "UTF8", "--no-instructions"], "initdb for the lab's PostgreSQL", timeout=300)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n# freezeframe lab: small, and reachable through the forwarded port\n"
                       "listen_addresses = '*'\nshared_buffers = 16MB\nmax_connections = 20\n"
                       "unix_socket_directories = '/run/postgresql'\n")
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
    else:
        host_tools.run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={data}",
              "--auth-root-authentication-method=normal", "--skip-test-db"],
             "mariadb-install-db for the lab's MariaDB", timeout=300)
        # Read by the server at every start (--init-file): the host's account.
        (root / "ff-lab-init.sql").write_text(
            f"CREATE USER IF NOT EXISTS '{MARIADB_USER}'@'%';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO '{MARIADB_USER}'@'%';\n")


def qemu_args(app: str, port: int) -> list[str]:
    """The network with the forwarded port, and the host's /usr shared read-only."""
    return [
        "-netdev", f"user,id=ffnet,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:{DATABASES[app]}",
        "-device", "virtio-net-pci,netdev=ffnet",
        "-virtfs", "local,path=/usr,mount_tag=hostusr,security_model=none,readonly=on,id=hostusr",
    ]


def writer_for(app: str, port: int) -> tuple[str, dict[str, str]]:
    """The writer kind and options that quiesce the lab's server from the host."""
    if app == "postgresql":
        return "postgresql", {"host": "127.0.0.1", "port": str(port), "user": "postgres"}
    return "mysql", {"host": "127.0.0.1", "port": str(port), "user": MARIADB_USER}
