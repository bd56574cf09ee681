"""The partners' OpenAPI document (the gateway's merge of every service's, gateway/openapi.py)
is complete and true: every operation has a summary and a description, every request body
and every error response an example, and every example is valid against its schema.

The document is built in-process from each app's own `openapi()`, merged as the gateway
merges what it fetches: no server, no database.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import orjson
import pytest

from gateway.openapi import merge
from gateway.upstream import SERVICES
from services.kit.errors import Conflict, NotFound
from services.kit.openapi import STANDARD, error_responses

METHODS = ("get", "put", "post", "patch", "delete")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    from gateway.app import create_app as create_gateway

    services = {
        name: importlib.import_module(f"services.{name}.app").create_app().openapi()
        for name in SERVICES
    }
    return merge(create_gateway().openapi(), services)


# Operations whose success answer has no example yet: the list may only shrink (a test
# below fails on an entry that has one, or that no longer exists).
WITHOUT_SUCCESS_EXAMPLE = {
    "POST /api/unified/create-user",
    "POST /api/unified/save-project",
    "GET /api/user-projects",
    "POST /api/cross-app/auth",
    "POST /api/enhance-image",
    "GET /api/admin/credit-stats",
    "POST /api/admin/refill-credits",
    "POST /api/background/process-tasks",
    "GET /v1/apps",
    "GET /v1/keys",
    "POST /v1/keys",
    "GET /v1/keys/{prefix}",
    "POST /v1/keys/{prefix}/revoke",
    "POST /v1/keys/{prefix}/rotate",
    "POST /v1/ledger/holds",
    "POST /v1/ledger/batch",
    "GET /v1/ledger/transactions",
    "PUT /v1/billing/catalog/{item_id}",
    "POST /v1/billing/verify",
    "GET /v1/billing/payments",
    "GET /v1/billing/alerts",
    "GET /v1/billing/admin/payments",
    "POST /v1/generation/story",
    "GET /v1/generation/story/{story_id}",
    "GET /v1/enhancement/tasks",
    "POST /v1/enhancement/tasks",
    "GET /v1/enhancement/tasks/{task_id}",
    "GET /v1/enhancement/tasks/{task_id}/result",
    "GET /v1/enhancement/alerts",
    "POST /v1/enhancement/background/process-tasks",
}


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in doc.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                yield f"{method.upper()} {path}", item[method]


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        *_, kind, name = schema["$ref"].split("/")
        schema = doc["components"][kind][name]
    return schema


def _has_example(doc: dict[str, Any], media: dict[str, Any]) -> bool:
    if media.get("example") is not None or media.get("examples"):
        return True
    schema = resolve(doc, media.get("schema", {}))
    # An optional body is `anyOf: [<the model>, null]`: the model's examples count.
    members = [schema, *(resolve(doc, s) for s in schema.get("anyOf", []))]
    return any(m.get("examples") or m.get("example") is not None for m in members)


def generated_summary(op: dict[str, Any]) -> bool:
    """FastAPI's summary when none is given: the function's name, title-cased (its
    operationId starts with that name)."""
    summary, operation_id = str(op.get("summary") or ""), str(op.get("operationId") or "")
    words = operation_id.split("_")
    return any(
        summary == " ".join(words[:n]).replace("_", " ").title() for n in range(1, len(words))
    )


def _json_success_without_example(doc: dict[str, Any], op: dict[str, Any]) -> list[str]:
    found = []
    for status, response in op.get("responses", {}).items():
        if not str(status).startswith("2"):
            continue
        for media_type, media in response.get("content", {}).items():
            if media_type.endswith("json") and not _has_example(doc, media):
                found.append(f"{status} {media_type} has no example")
    return found


def offenders(doc: dict[str, Any]) -> list[str]:
    """What lacks a summary, a description or an example, one line each."""
    found = []
    for where, op in operations(doc):
        for field in ("summary", "description"):
            if not str(op.get(field) or "").strip():
                found.append(f"{where}: no {field}")
        if generated_summary(op):
            found.append(f"{where}: summary {op['summary']!r} is FastAPI's, from the function name")
        if where not in WITHOUT_SUCCESS_EXAMPLE:
            found += [f"{where}: {gap}" for gap in _json_success_without_example(doc, op)]
        for media_type, media in op.get("requestBody", {}).get("content", {}).items():
            if not _has_example(doc, media):
                found.append(f"{where}: request body {media_type} has no example")
        for status, response in op.get("responses", {}).items():
            if not str(status).startswith(("4", "5")):
                continue
            if not str(response.get("description") or "").strip():
                found.append(f"{where}: {status} has no description")
            content = response.get("content", {})
            if not any(m.get("example") is not None or m.get("examples") for m in content.values()):
                found.append(f"{where}: {status} has no example")
    return found


def _examples(media: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    if "example" in media:
        yield "example", media["example"]
    for name, example in (media.get("examples") or {}).items():
        yield f"example {name}", example.get("value")


def false_examples(doc: dict[str, Any]) -> list[str]:
    """Every example (media-level, and a request schema's own `examples`) that its
    schema refuses, one line each."""
    found = []
    components = {"components": doc.get("components", {})}
    validators: dict[bytes, Any] = {}
    for where, op in operations(doc):
        body = op.get("requestBody", {}).get("content", {})
        medias = [(f"request body {t}", m) for t, m in body.items()]
        medias += [
            (f"{status} {t}", m)
            for status, response in op.get("responses", {}).items()
            for t, m in response.get("content", {}).items()
        ]
        for label, media in medias:
            schema = media.get("schema")
            if not schema:
                continue
            key = orjson.dumps(schema)
            if key not in validators:
                validators[key] = jsonschema_rs.Draft202012Validator({**schema, **components})
            validator = validators[key]
            candidates = list(_examples(media))
            if label.startswith("request body"):
                own = resolve(doc, schema).get("examples") or []
                candidates += [(f"schema example {i}", e) for i, e in enumerate(own)]
            for name, example in candidates:
                for error in validator.iter_errors(example):
                    found.append(f"{where}: {label} {name}: {str(error).splitlines()[0]}")
    return found


def dangling_refs(doc: dict[str, Any]) -> list[str]:
    text = orjson.dumps(doc).decode()
    refs = {part.split('"', 1)[0] for part in text.split('"$ref":"#/')[1:]}
    missing = []
    for ref in sorted(refs):
        node: Any = doc
        for key in ref.split("/"):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            missing.append(ref)
    return missing


class TestTheDocument:
    def test_every_operation_body_and_error_is_documented(self, document: dict[str, Any]):
        assert offenders(document) == []

    def test_the_list_without_a_success_example_only_shrinks(self, document: dict[str, Any]):
        ops = dict(operations(document))
        stale = [
            where
            for where in sorted(WITHOUT_SUCCESS_EXAMPLE)
            if where not in ops or not _json_success_without_example(document, ops[where])
        ]
        assert stale == [], "remove these from WITHOUT_SUCCESS_EXAMPLE"

    def test_every_example_is_valid_against_its_schema(self, document: dict[str, Any]):
        assert false_examples(document) == []

    def test_every_reference_resolves(self, document: dict[str, Any]):
        # The enhancement upload body once pointed at a TaskCreate no component defined.
        assert dangling_refs(document) == []

    def test_errors_are_documented_in_the_shapes_sent(self, document: dict[str, Any]):
        # FastAPI's default 422 (`{"detail": [...]}`) is never what Ku sends.
        assert "HTTPValidationError" not in document["components"]["schemas"]
        for where, op in operations(document):
            for status, response in op["responses"].items():
                if str(status).startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    shape = "CompatError" if where.split()[1].startswith("/api/") else "ErrorBody"
                    assert ref.endswith(f"/{shape}"), (where, status, ref)

    def test_every_operation_documents_the_gateways_own_answers(self, document: dict[str, Any]):
        for where, op in operations(document):
            assert {"429", "502", "503", "504"} <= set(op["responses"]), where

    def test_public_operations_need_no_credentials(self, document: dict[str, Any]):
        public = {w for w, op in operations(document) if op.get("security") == []}
        assert {
            "POST /v1/auth/sso",
            "GET /.well-known/jwks.json",
            "POST /v1/billing/webhooks/razorpay",
            "GET /api/unified/health",
            "POST /api/cross-app/auth",
            "POST /api/background/process-tasks",
        } <= public
        assert "POST /v1/ledger/debits" not in public


class TestTheChecks:
    """The checks above can fail, and name what fails."""

    def test_a_bare_operation_is_named_for_each_gap(self):
        doc = {
            "paths": {
                "/v1/things": {
                    "post": {
                        "summary": "Create Thing",
                        "operationId": "create_thing_v1_things_post",
                        "requestBody": {
                            "content": {"application/json": {"schema": {"type": "object"}}}
                        },
                        "responses": {
                            "201": {
                                "description": "Created",
                                "content": {"application/json": {"schema": {"type": "object"}}},
                            },
                            "404": {"description": ""},
                            "422": {"description": "Invalid input"},
                        },
                    }
                }
            }
        }
        assert offenders(doc) == [
            "POST /v1/things: no description",
            "POST /v1/things: summary 'Create Thing' is FastAPI's, from the function name",
            "POST /v1/things: 201 application/json has no example",
            "POST /v1/things: request body application/json has no example",
            "POST /v1/things: 404 has no description",
            "POST /v1/things: 404 has no example",
            "POST /v1/things: 422 has no example",
        ]

    def test_a_written_summary_is_not_taken_for_fastapis(self):
        op = {"summary": "Create a thing", "operationId": "create_thing_v1_things_post"}
        assert not generated_summary(op)
        assert generated_summary({**op, "summary": "Create Thing"})
        assert generated_summary({"summary": "Sso", "operationId": "sso_v1_auth_sso_post"})

    def test_an_example_its_schema_refuses_is_named(self):
        responses = error_responses({404: "Unknown thing"})
        responses[404]["content"]["application/json"]["example"] = {"error": {"code": 404}}
        doc = {
            "paths": {
                "/v1/things": {
                    "get": {
                        "responses": {
                            "404": {
                                **responses[404],
                                "content": {
                                    "application/json": {
                                        **responses[404]["content"]["application/json"],
                                        "schema": {"$ref": "#/components/schemas/Error"},
                                    }
                                },
                            }
                        }
                    }
                }
            },
            "components": {
                "schemas": {
                    "Error": {
                        "type": "object",
                        "required": ["error"],
                        "properties": {
                            "error": {
                                "type": "object",
                                "required": ["code", "message"],
                                "properties": {"code": {"type": "string"}},
                            }
                        },
                    }
                }
            },
        }
        found = false_examples(doc)
        assert len(found) == 2 and all(f.startswith("GET /v1/things: 404") for f in found)

    def test_a_dangling_reference_is_named(self):
        doc = {"paths": {"/x": {"post": {"requestBody": {"$ref": "#/components/schemas/Gone"}}}}}
        assert dangling_refs(doc) == ["components/schemas/Gone"]


class TestErrorResponses:
    """The kit's helper (services/kit/openapi.py): examples are the errors' own bodies."""

    def test_a_description_alone_shows_the_standard_error(self):
        response = error_responses({404: "Unknown user"})[404]
        assert response["description"] == "Unknown user"
        example = response["content"]["application/json"]["example"]
        assert example == STANDARD[404].body()
        assert example["error"]["code"] == "unknown_user"

    def test_several_errors_are_named_examples(self):
        errors = [NotFound("No such hold", code="hold_not_found"), STANDARD[404]]
        media = error_responses({404: ("Unknown user or hold", errors)})[404]["content"]
        examples = media["application/json"]["examples"]
        assert examples["hold_not_found"]["value"] == errors[0].body()
        assert examples["unknown_user"]["value"] == STANDARD[404].body()

    def test_an_error_documented_under_another_status_is_refused(self):
        with pytest.raises(ValueError, match="idempotency_key_reused is a 409"):
            error_responses({404: ("Unknown", Conflict(code="idempotency_key_reused"))})
