"""A new share's schema is made in one commit: Python's sqlite3 opens no transaction
before a CREATE, so each statement was a commit of its own (92 fdatasyncs in a plain
``backer init``, ~0.66 s of a join's set-up under load), and a process killed midway
left half a schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from backer.db import catalog as catalog_module
from backer.db.catalog import Catalog


def test_every_schema_statement_of_a_new_catalog_runs_inside_one_transaction(
    tmp_path: Path,
) -> None:
    conn = sqlite3.connect(tmp_path / "new.db")
    traced: list[tuple[str, bool]] = []
    conn.set_trace_callback(lambda sql: traced.append((sql.split()[0], conn.in_transaction)))
    Catalog(sqlite_utils.Database(conn))
    schema = [inside for verb, inside in traced if verb in ("CREATE", "ALTER")]
    assert len(schema) >= 10 and all(schema)
    assert [verb for verb, _ in traced].count("BEGIN") == 1 and not conn.in_transaction
    assert "live" in sqlite_utils.Database(conn).table_names()  # (committed)


def test_a_schema_that_fails_midway_leaves_no_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Catalog) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(catalog_module.Catalog, "_add_indexes", broken)
    conn = sqlite3.connect(tmp_path / "new.db")
    with pytest.raises(sqlite3.OperationalError):
        Catalog(sqlite_utils.Database(conn))
    assert sqlite_utils.Database(conn).table_names() == []
