"""`fieldsync serve` refuses bad settings with one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SECRET, free_port
from tests.pg_cluster import PostgresCluster


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", str(free_port()), *args],
        cwd=ROOT,
        env={**os.environ, "FIELDSYNC_JWT_SECRET": SECRET, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--tenant-merges", "0"), {}, "--tenant-merges: expected a whole number of at least 1"),
        ((), {"FIELDSYNC_TENANT_MERGES": "-3"}, "--tenant-merges: expected a whole number"),
        ((), {"FIELDSYNC_RATE_DEVICE": "lots"}, "--rate-device: a rate is N/second"),
        (("--node-id", "node 1"), {}, "--node-id: a node id is"),
        (("--rate-hold", "-1"), {}, "--rate-hold: expected a number of at least 0"),
        ((), {"FIELDSYNC_RATE_HOLD_S": "nan"}, "--rate-hold: expected a number of at least 0"),
        ((), {"FIELDSYNC_QUICK_REFUSALS": "sometimes"}, "--quick-refusals: expected on or off"),
    ],
)
def test_bad_settings_are_one_line_errors(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    done = _serve(tmp_path, "--db", str(tmp_path / "x.db"), *args, **env)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("db", ["sqlite://x.db", "mysql://u@h/db", "file:///tmp/x.db"])
def test_a_database_url_of_another_kind_is_refused(tmp_path: Path, db: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--db", db],
        cwd=tmp_path,
        env={**os.environ, "FIELDSYNC_JWT_SECRET": SECRET, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--db is a SQLite file path, sqlite:///PATH or a postgresql:// URL" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no "sqlite:" folder, no database file


def test_a_sqlite_url_names_the_file(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    done = subprocess.run(
        [sys.executable, "-m", "server", "token", "--db", f"sqlite:///{db}", "--tenant", "t"]
        + ["--bus", "bu1", "--user", "u"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "FIELDSYNC_JWT_SECRET"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert Path(f"{db}.jwt-secret").exists()  # the dev secret beside the file the URL names


def test_an_unreachable_database_is_one_line_and_a_failure(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = _serve(tmp_path, "--db", f"postgresql://nobody@127.0.0.1:{port}/none")
    assert done.returncode == 1
    assert "fieldsync: cannot open PostgreSQL" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_damaged_node_file_is_refused(tmp_path: Path, postgres_cluster: PostgresCluster) -> None:
    dsn = postgres_cluster.create_database("cli_node_file")
    kept = tmp_path / "node.id"
    kept.write_text("not a node id\n")
    done = _serve(tmp_path, "--db", dsn, "--node-file", str(kept))
    assert done.returncode == 1
    assert "does not hold a node id" in done.stderr and "Traceback" not in done.stderr
