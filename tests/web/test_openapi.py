"""The OpenAPI document: one source (receiver/web/openapi.py), served as-is, kept in docs/, and
covering exactly the routes the app has."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Match, Route

from receiver.web import openapi
from tests.conftest import Bridge

pytestmark = pytest.mark.anyio
DOC = Path(__file__).parent.parent.parent / "docs" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def test_docs_file_is_what_the_code_builds() -> None:
    assert DOC.read_bytes() == openapi.rendered(), (
        "docs/openapi.json is stale: python -m receiver.web.openapi > docs/openapi.json")


async def test_served_document_is_the_built_one(bridge: Bridge) -> None:
    r = await bridge.client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.content == openapi.rendered()
    # No credential, nothing read per request.
    assert (await bridge.client.head("/openapi.json")).status_code == 200


def _concrete(template: str) -> str:
    return re.sub(r"\{[^}/]+\}", "x", template)


def _route_for(routes: list[Route], path: str, method: str) -> Route:
    scope: dict[str, Any] = {"type": "http", "path": path, "method": method, "root_path": ""}
    full = [r for r in routes if r.matches(scope)[0] is Match.FULL]
    assert len(full) == 1, f"{method} {path} is served by {len(full)} routes"
    return full[0]


async def test_every_route_documented_and_every_operation_routed(bridge: Bridge) -> None:
    routes = [r for r in bridge.app.routes if isinstance(r, Route)]
    assert len(routes) == len(bridge.app.routes), "a route that is not a plain Route"
    served = {(r.path, m) for r in routes for m in (r.methods or ())}
    documented: set[tuple[str, str]] = set()
    for template, item in openapi.document()["paths"].items():
        for method in (m for m in METHODS if m in item):
            route = _route_for(routes, _concrete(template), method.upper())
            documented.add((route.path, method.upper()))
            # Starlette answers HEAD wherever it answers GET; HEAD is GET without the body.
            if method == "get":
                documented.add((route.path, "HEAD"))
    assert documented == served


def test_every_operation_documents_its_errors_and_auth() -> None:
    doc = openapi.document()
    schemes = doc["components"]["securitySchemes"]
    for template, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert "500" in responses, (method, template)
            assert "400" in responses, (method, template)  # the HTTP server's, at least
            for status, response in responses.items():
                if int(status) < 400 or response == openapi.BAD_HEAD:
                    continue
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (template, status)
            for requirement in op.get("security", []):
                assert set(requirement) <= set(schemes)
            if "security" in op:
                # A credential is checked: a refusal is documented (401, or 404 where an
                # unknown id and a refused credential must look the same).
                assert {"401", "404"} & set(responses), template
    assert doc["paths"]["/healthz"]["get"].get("security") is None


def test_document_is_valid_json_and_names_every_schema_it_references() -> None:
    text = openapi.rendered().decode()
    doc = json.loads(text)
    names = set(doc["components"]["schemas"])
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):
        assert ref in names, ref


async def test_a_wrong_method_is_405_with_allow(bridge: Bridge) -> None:
    # Found by schemathesis (tests/web/test_schemathesis.py): RFC 9110 requires `Allow` on a 405.
    r = await bridge.client.delete("/healthz")
    assert r.status_code == 405
    assert r.json() == {"error": "method not allowed"}
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD"}
    r = await bridge.client.get("/events")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
