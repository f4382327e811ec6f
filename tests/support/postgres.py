"""A throw-away PostgreSQL cluster of Debian's `postgresql` package, on 127.0.0.1.

Run as the `postgres` system user (initdb refuses root) in a directory of its own under
/tmp; trust authentication on the loopback; fsync off (a test cluster, thrown away).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from tests.support.procs import Process, free_port, wait_until

PG_LIB = Path("/usr/lib/postgresql")
INDEX_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"


def pg_bin() -> Path:
    versions = sorted((p for p in PG_LIB.glob("*/bin/postgres")), key=lambda p: int(
        p.parts[-3]))
    if not versions:
        raise AssertionError("PostgreSQL is not installed: scripts/setup.sh --test installs "
                             "Debian's postgresql")
    return versions[-1].parent


class Postgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="objfs-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "postgres.log"
        as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        subprocess.run([*as_postgres, str(pg_bin() / "initdb"), "-D", str(self.data), "-A",
                        "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"], check=True,
                       capture_output=True)
        self.process = Process([*as_postgres, str(pg_bin() / "postgres"), "-D", str(self.data),
                                "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                                "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off",
                                "-c", "max_connections=200"], self.log)
        wait_until(self._answers, 60, "PostgreSQL", self.process.proc, self.log)

    def conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def _answers(self) -> bool:
        try:
            with psycopg.connect(self.conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def query(self, database: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.conninfo(database), autocommit=True) as conn:
            return list(conn.execute(sql, args).fetchall())

    def section(self, database: str) -> dict[str, Any]:
        """Orthanc's PostgreSQL section for several nodes on this index (objfs reads it too)."""
        return {"EnableIndex": True, "EnableStorage": False, "Host": "127.0.0.1",
                "Port": self.port, "Database": database, "Username": "postgres",
                "Password": "unused-trust", "Lock": False}

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
