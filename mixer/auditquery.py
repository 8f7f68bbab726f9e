"""Queries over the audit trail: DuckDB views on the Parquet tree, canned reports.

Views (``open_views``):

* ``events`` — every archived event: the file columns (``mixer.auditrow.SCHEMA``) plus the
  hive partitions typed (``date`` DATE, ``hour`` INTEGER: DuckDB would read a zero-padded
  ``hour=08`` as text unless told). A filter on ``rack``, ``date`` or ``hour`` prunes whole
  directories.
* ``txn`` — the ISO 8583 transactions and edge rejections (``kind`` ``iso8583.txn`` or
  ``iso8583.rejected``), without the raw bytes and chain columns.

An archive with no part yet gives empty views of the same columns, so a query is never an
error because nothing was archived.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]

from mixer.auditrow import SCHEMA

GLOB: Final = "*/rack=*/date=*/hour=*/*.parquet"
TXN_KINDS: Final = ("iso8583.txn", "iso8583.rejected")


class QueryError(ValueError):
    """A query that is not allowed or not valid (DuckDB's words where it has them)."""


def open_views(root: Path, con: duckdb.DuckDBPyConnection | None = None,
               sandbox: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the ``events`` and ``txn`` views over ``root`` (the hub's
    ``audit/`` directory).

    With ``sandbox`` (the CLI's), the connection may read files under ``root`` only and its
    configuration is locked: a query cannot read the hub's keys or write anywhere.
    """
    con = con or duckdb.connect()
    if sandbox:
        con.execute("SET allowed_directories = ?", [[str(root.resolve()) + "/"]])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    if any(root.glob(GLOB)):
        pattern = str(root / GLOB).replace("'", "''")
        con.execute(
            f"CREATE OR REPLACE VIEW events AS SELECT * FROM read_parquet('{pattern}', "
            f"hive_partitioning = true, hive_types = {{'date': DATE, 'hour': INTEGER}}, "
            f"union_by_name = true)")
    else:
        empty = pa.table({f.name: pa.array([], f.type) for f in SCHEMA})
        con.register("_audit_empty", empty)
        con.execute("CREATE OR REPLACE VIEW events AS SELECT *, NULL::DATE AS date, "
                    "NULL::INTEGER AS hour FROM _audit_empty")
    kinds = ", ".join(f"'{k}'" for k in TXN_KINDS)
    con.execute(f"CREATE OR REPLACE VIEW txn AS SELECT * EXCLUDE (cbor, chain) FROM events "
                f"WHERE kind IN ({kinds})")
    return con


DAILY_SQL: Final = """
SELECT rack, de39, issuer, count(*) AS events, sum(amount) AS amount,
       round(quantile_cont(latency_us, 0.5)) AS p50_us,
       round(quantile_cont(latency_us, 0.99)) AS p99_us
FROM txn WHERE date = ?
GROUP BY ALL ORDER BY rack, de39, issuer
"""


def daily_report(con: duckdb.DuckDBPyConnection, day: str) -> tuple[list[str],
                                                                        list[tuple[Any, ...]]]:
    """Counts, amounts and p50/p99 latency by rack, DE39 and issuer for ``day``
    (``YYYY-MM-DD``): (column names, rows)."""
    rel = con.execute(DAILY_SQL, [day])
    cols = [d[0] for d in rel.description]
    return cols, rel.fetchall()


_READ_ONLY: Final = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str],
                                                                   list[tuple[Any, ...]]]:
    """Run ``sql`` over the views: (column names, rows).

    Raises:
        QueryError: not a read-only query (``SELECT``, ``WITH``, ``DESCRIBE``, ``SHOW``,
            ``EXPLAIN``), or DuckDB refused it (its message says where).
    """
    try:
        statements = con.extract_statements(sql)
        for st in statements:
            if st.type not in _READ_ONLY:
                raise QueryError(f"only read-only queries run here: got "
                                 f"{st.type.name.lower()} statement")
        if len(statements) != 1:
            raise QueryError(f"one statement at a time: got {len(statements)}")
        rel = con.execute(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    if rel.description is None:
        return [], []
    return [d[0] for d in rel.description], rel.fetchall()


__all__ = ["DAILY_SQL", "GLOB", "QueryError", "TXN_KINDS", "daily_report", "open_views", "run_query"]
