"""The OpenAPI document matches the gateway's routes, is valid OpenAPI 3.1, and is the one in docs/.

The routes come from the real ``create_app`` of a real (unstarted) Runtime: a route added to
the gateway without a line in ``runtime/http/openapi.py`` fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.http.openapi import OPENAPI_PATH, document, rendered
from runtime.settings import load_settings
from tests.support import write_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


@pytest.fixture
def runtime_with(tmp_path):
    """A Runtime built from a config with ``runtime`` settings, never started; stopped after."""
    from runtime.server.app import Runtime

    made = []

    def make(**runtime):
        env = write_config(tmp_path / "clients.yaml", [], workers={"zygote": False}, **runtime)
        made.append(Runtime(load_settings(tmp_path / "clients.yaml", env)))
        return made[-1]

    yield make
    for rt in made:
        rt.stop()


def routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route; HEAD only as GET's twin (aiohttp adds one per GET)."""
    pairs = {(r.method, r.resource.canonical) for r in app.router.routes()}
    heads = {p for m, p in pairs if m == "HEAD"}
    assert heads == {p for m, p in pairs if m == "GET"}, "a HEAD route that is not a GET's twin"
    return {(m, p) for m, p in pairs if m != "HEAD"}


def documented() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in document()["paths"].items() for method in ops}


def test_every_route_of_the_gateway_is_documented_and_nothing_else(runtime_with):
    from runtime.http.gateway import create_app

    app = create_app(runtime_with())
    assert routes(app) == documented()
    assert ("GET", OPENAPI_PATH) in routes(app)


def test_with_a_metrics_listener_the_gateway_lacks_only_metrics_which_the_listener_has(runtime_with):
    from runtime.http.gateway import create_app
    from runtime.http.metrics_listener import create_metrics_runner

    runtime = runtime_with(metrics={"host": "127.0.0.1", "port": 9464})
    assert documented() - routes(create_app(runtime)) == {("GET", "/metrics")}
    assert routes(create_metrics_runner(runtime).app) == {("GET", "/metrics")}
    assert "404" in document()["paths"]["/metrics"]["get"]["responses"]  # what the gateway then answers


def test_the_document_is_valid_openapi_3_1():
    import schemathesis

    schema = schemathesis.openapi.from_dict(document())
    schema.validate()  # against the OpenAPI 3.1 meta-schema schemathesis ships
    assert document()["openapi"].startswith("3.1")
    assert len(list(schema.get_all_operations())) == len(documented())


def test_docs_openapi_json_is_the_document_the_gateway_serves():
    assert DOCS.read_text(encoding="utf-8") == rendered(), "regenerate: python -m runtime.http.openapi > docs/openapi.json"
    assert json.loads(DOCS.read_text(encoding="utf-8")) == document()


def test_every_refusal_is_documented_as_error_and_detail():
    for path, ops in document()["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                if int(status) < 400 or (path, status) == ("/readyz", "503"):  # warming: a status, not a refusal
                    continue
                schema = response["content"]["application/json"]["schema"]
                assert schema["required"] == ["error", "detail"], (method, path, status)
                assert schema["properties"]["error"]["enum"], (method, path, status)
