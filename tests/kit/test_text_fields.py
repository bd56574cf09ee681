"""Every `str` a client can send is checked for NUL and unpaired surrogates at the edge.

The check is a pydantic validator carried by the kit's field types (`services.kit.schemas`);
this test walks every route of every service and of the gateway and fails on a request
field that can hold a `str` without it, so a new field cannot forget it. Query strings
and paths are checked once for all by the kit's middleware (the gateway, whose compat
routes answer in the seeds' shape, checks its own parameters field by field instead).
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from uuid import UUID

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from services.kit.middleware import RequestContextMiddleware
from services.kit.schemas import JsonGuard, TextGuard, bad_text, check_json, check_text

SAFE_LEAVES = (int, float, bool, bytes, Decimal, datetime, date, timedelta, UUID, type(None))


def _apps() -> dict[str, FastAPI]:
    from gateway.app import create_app as gateway
    from services.auth.app import create_app as auth
    from services.enhancement.app import create_app as enhancement
    from services.generation.app import create_app as generation
    from services.ledger.app import create_app as ledger
    from services.workspace.app import create_app as workspace

    return {
        "auth": auth(),
        "ledger": ledger(),
        "workspace": workspace(),
        "generation": generation(),
        "enhancement": enhancement(),
        "gateway": gateway(),
    }


def _routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # FastAPI's included router
            yield from _routes(route.original_router.routes)
        elif hasattr(route, "routes"):
            yield from _routes(route.routes)


def _guards(metadata: list[Any]) -> set[str]:
    found = set()
    for m in metadata:
        func = getattr(m, "func", None)
        if m is TextGuard or func is check_text:
            found.add("text")
        if m is JsonGuard or func is check_json:
            found.add("json")
    return found


def unguarded(annotation: Any, metadata: list[Any], where: str, seen: set[Any]) -> list[str]:
    """Places under `where` where a `str` can arrive without the kit's check."""
    guards = _guards(metadata)
    if "json" in guards:
        return []  # every key and string inside is checked
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        return unguarded(inner, [*metadata, *extra], where, seen)
    if annotation is str:
        return [] if "text" in guards else [where]
    if annotation is Any or annotation is object:
        return [where]
    if origin in (Union, types.UnionType):
        return [p for arg in get_args(annotation) for p in unguarded(arg, metadata, where, seen)]
    if origin is Literal:
        return []
    if origin in (list, set, frozenset, tuple, typing.Sequence, dict, typing.Mapping):
        args = [a for a in get_args(annotation) if a is not Ellipsis] or [Any]
        return [p for arg in args for p in unguarded(arg, [], f"{where}[]", seen)]
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            if annotation in seen:
                return []
            seen.add(annotation)
            return [
                p
                for name, field in annotation.model_fields.items()
                for p in unguarded(field.annotation, list(field.metadata), f"{where}.{name}", seen)
            ]
        if issubclass(annotation, (enum.Enum, *SAFE_LEAVES)):
            return []
        if issubclass(annotation, str):
            return [] if "text" in guards else [where]
    return [f"{where} (unknown type {annotation!r})"]


def _checks_urls(app: FastAPI) -> bool:
    for m in app.user_middleware:
        if m.cls is RequestContextMiddleware:
            return bool(m.kwargs.get("check_url", True))
    return False


def _request_fields(route: APIRoute, urls_checked: bool) -> Iterator[tuple[str, Any]]:
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        stack.extend(dependant.dependencies)
        params = list(dependant.body_params)
        if not urls_checked:
            params += [*dependant.query_params, *dependant.path_params]
        # Headers and cookies cannot carry NUL (the HTTP parser refuses it) nor a
        # surrogate (they are decoded as latin-1).
        for param in params:
            yield param.name, param.field_info


@pytest.fixture(scope="module")
def apps(ku_database_url: str) -> dict[str, FastAPI]:
    return _apps()


class TestEveryTextFieldIsGuarded:
    def test_no_request_field_takes_unchecked_text(self, apps: dict[str, FastAPI]) -> None:
        missing: list[str] = []
        counted = 0
        for name, app in apps.items():
            urls_checked = _checks_urls(app)
            for route in _routes(app.router.routes):
                for field, info in _request_fields(route, urls_checked):
                    counted += 1
                    where = f"{name} {sorted(route.methods or ())} {route.path} {field}"
                    missing += unguarded(info.annotation, list(info.metadata), where, set())
        assert counted > 30  # the walk found the routes
        assert missing == []

    def test_services_check_urls_and_the_gateway_checks_its_fields(
        self, apps: dict[str, FastAPI]
    ) -> None:
        assert {name: _checks_urls(app) for name, app in apps.items()} == {
            "auth": True,
            "ledger": True,
            "workspace": True,
            "generation": True,
            "enhancement": True,
            "gateway": False,
        }

    def test_the_walk_catches_a_plain_str(self) -> None:
        class Inner(BaseModel):
            note: str

        class Body(BaseModel):
            ok: Annotated[str, TextGuard] | None = None
            items: list[Inner]
            extra: dict[str, Any]
            meta: Annotated[dict[str, Any], JsonGuard]
            kind: Literal["a", "b"]

        found = unguarded(Body, [], "body", set())
        assert sorted(found) == ["body.extra[]", "body.extra[]", "body.items[].note"]


class TestTheCheck:
    @pytest.mark.parametrize(
        "text", ["a\x00b", "\x00", "x\ud800", "\udfff", "é\ud83d", "tail\udc00", "é\x00"]
    )
    def test_refused(self, text: str) -> None:
        assert bad_text(text)
        with pytest.raises(ValueError):
            check_text(text)
        with pytest.raises(ValueError):
            check_json({"ok": [1, {"deep": text}]})
        with pytest.raises(ValueError):
            check_json({text: 1})

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "plain",
            "émoji 😀",
            "\ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16"),
            "tab\tnew\nline",
            "日本語",
        ],
    )
    def test_accepted(self, text: str) -> None:
        assert not bad_text(text)
        assert check_text(text) == text
        assert check_json({"k": [text]}) == {"k": [text]}

    @pytest.mark.parametrize("number", [2**63, -(2**63) - 1, 3864634730786058408655060992])
    def test_an_integer_beyond_64_bits_is_refused(self, number: int) -> None:
        with pytest.raises(ValueError, match="64 bits"):
            check_json({"k": [1, {"deep": number}]})

    def test_64_bit_integers_and_other_numbers_are_accepted(self) -> None:
        doc = {"a": 2**63 - 1, "b": -(2**63), "c": 9.2e18, "d": True, "e": -0.5}
        assert check_json(doc) == doc

    @pytest.mark.parametrize("number", [1e19, -1e19, 1e300, float("nan"), float("inf")])
    def test_a_float_beyond_64_bits_or_not_finite_is_refused(self, number: float) -> None:
        # Postgres gives 1e300 back from jsonb as 301 plain digits, and NaN as null.
        with pytest.raises(ValueError, match="finite and fit in 64 bits"):
            check_json({"k": [1, {"deep": number}]})

    def test_a_deep_document_does_not_exhaust_the_stack(self) -> None:
        doc: Any = "x\x00"
        for _ in range(100_000):
            doc = [doc]
        with pytest.raises(ValueError):
            check_json(doc)

    def test_pydantic_reports_the_field(self) -> None:
        from services.kit.schemas import Description

        class Body(BaseModel):
            description: Description

        with pytest.raises(ValidationError) as caught:
            Body.model_validate({"description": "a\x00"})
        (error,) = caught.value.errors()
        assert error["type"] == "invalid_text" and error["loc"] == ("description",)
