"""The statements PostgresBackend runs on every call stay within what psycopg caches its parse of, for any
schema name PostgreSQL accepts (a longer text is parsed again on every call)."""

from __future__ import annotations

import re

import pytest
from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH, MAX_CACHED_STATEMENT_PARAMS

from lifecycle.asynctask._backends.postgres._schema import MAX_IDENTIFIER
from lifecycle.asynctask._backends.postgres._sql import HOT_STATEMENTS, Statements

_PLACEHOLDER = re.compile(rb"%(?:\((?P<name>[^)]+)\))?[sbt]")

# The longest schema names as rendered: every quote in a quoted identifier is doubled.
_LONGEST = ["s" * MAX_IDENTIFIER, '"' * MAX_IDENTIFIER, "é" * (MAX_IDENTIFIER // 2) + "s"]


@pytest.mark.parametrize("schema", _LONGEST, ids=["ascii", "quotes", "utf-8"])
@pytest.mark.parametrize("name", HOT_STATEMENTS)
def test_a_hot_statement_stays_under_psycopg_s_cached_statement_limits(schema: str, name: str) -> None:
    assert len(schema.encode()) == MAX_IDENTIFIER
    text = getattr(Statements.for_schema(schema), name)
    assert isinstance(text, bytes)
    assert len(text) <= MAX_CACHED_STATEMENT_LENGTH, f"{name} is {len(text)} bytes for a {schema[0]!r} schema"
    placeholders = [match["name"] or index for index, match in enumerate(_PLACEHOLDER.finditer(text))]
    assert len(set(placeholders)) <= MAX_CACHED_STATEMENT_PARAMS
