"""create_app: every route module is part of the server; a missing one is an error, not a smaller API."""

from __future__ import annotations

import pytest

from gpt2serve.api import app as app_module
from tests.api.conftest import make_settings


def test_a_missing_route_module_fails_create_app(monkeypatch, tmp_path) -> None:
    missing = "gpt2serve.api.routes.no_such_routes"
    monkeypatch.setattr(app_module, "ROUTE_MODULES", (*app_module.ROUTE_MODULES, missing))
    with pytest.raises(ModuleNotFoundError, match="no_such_routes"):
        app_module.create_app(make_settings(str(tmp_path)))


def test_every_route_module_is_mounted(tmp_path) -> None:
    paths = set(app_module.create_app(make_settings(str(tmp_path))).openapi()["paths"])
    assert {"/invocations", "/v1/completions", "/metrics", "/info"} <= paths
