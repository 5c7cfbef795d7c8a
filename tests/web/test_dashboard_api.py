"""The public face of ``lifecycle.asynctask.web``: one name, its documented signature (a contract), its
docstring and public module; importing it needs no extra."""

from __future__ import annotations

import inspect

import lifecycle.asynctask.web as web
from tests.docstring_check import missing_docstrings


def test_the_module_exports_dashboard_only() -> None:
    assert web.__all__ == ("dashboard",)
    assert web.dashboard.__module__ == "lifecycle.asynctask.web"
    assert missing_docstrings(web, web.__all__) == []


def test_the_signature_is_the_contract() -> None:
    parameters = inspect.signature(web.dashboard).parameters
    assert list(parameters) == ["source", "token", "read_only", "title"]
    assert parameters["source"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert [parameters[name].kind for name in ("token", "read_only", "title")] == [
        inspect.Parameter.KEYWORD_ONLY
    ] * 3
    assert [parameters[name].default for name in ("token", "read_only", "title")] == [None, None, "lifecycle"]
