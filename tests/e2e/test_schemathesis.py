"""Schemathesis over the merged OpenAPI document, through the gateway of a real suite
(every service and the gateway as processes, `Suite`): for each operation, a few
generated requests (MAX_EXAMPLES valid ones, then invalid ones) must get no 5xx, a
response valid against the operation's documented schema, and, without credentials or
with wrong ones, a 401/403 wherever the document says auth is needed.

Authenticated as a first-party app (Penora) with narrow scopes: admin operations answer
403 and are exercised only that far. Generation runs on the offline provider, billing
against a fake Razorpay, image fetches against a loopback image host (`wired`). A few
operations are also probed directly without credentials and with a wrong key (PROBED),
the event stream only that way (AUTH_ONLY, which says why).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import ignored_auth, response_schema_conformance

from services.kit.runner import Suite
from services.kit.testing.plugin import ku_cli
from tests.console.conftest import razorpay_env, razorpay_in_a_thread, serve_directory
from tests.gateway.helpers import make_signing_key, new_user_id
from tests.ku_suite import wait_for_account
from tests.ledger.billing.fake_razorpay import FakeRazorpay

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 2  # valid requests per operation, and one invalid (25 found nothing more)
NEGATIVE_EXAMPLES = 1
SCOPES = (
    "ledger:read,ledger:write,workspace:read,workspace:write,generate,enhance,users:write,users:any"
)
# Exercised only without credentials and with a wrong key (`auth_failures`: 401 or 403,
# never a 2xx or a 5xx), not with valid ones: an endless event stream, whose
# authenticated request never completes (tests/gateway/test_events.py).
AUTH_ONLY = {("GET", "/v1/events")}
# They fetch the image at the URL they are given: generated URLs would mean DNS look-ups
# and connections to arbitrary hosts, traffic off this machine. In the document they are
# tested against (`wired`), the URL can only be a PNG on a loopback image host; they get
# every check on valid requests (not invalid ones: those could be any URL).
VALID_ONLY = {("POST", "/v1/enhancement/tasks"), ("POST", "/api/enhance-image")}
# Razorpay's operations get every check, against the fake Razorpay (tests/ledger/billing),
# with the order's user and item one of this suite's (`wired`), so orders reach it. All
# of these are also probed without credentials and with a wrong key (a generated request
# is rarely a 2xx, when ignored_auth probes). The webhook is public: its signature is
# its authentication.
PROBED = {
    ("POST", "/v1/billing/orders"),
    ("POST", "/v1/billing/subscriptions"),
    ("POST", "/v1/billing/verify"),
    ("POST", "/v1/billing/webhooks/razorpay"),
    *AUTH_ONLY,
    *VALID_ONLY,
}
WRONG_KEY = {"X-API-Key": "ku_nosuch00_" + "x" * 43}
CHECKS = [not_a_server_error, response_schema_conformance, ignored_auth]


@pytest.fixture(scope="module")
def razorpay() -> Iterator[FakeRazorpay]:
    with razorpay_in_a_thread() as fake:
        yield fake


@pytest.fixture(scope="module")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PNG on a loopback HTTP server: the one image URL the enhancement operations get."""
    directory = tmp_path_factory.mktemp("images")
    Image.new("RGB", (48, 32), (200, 120, 40)).save(directory / "photo.png")
    with serve_directory(directory) as origin:
        yield origin


@pytest.fixture(scope="module")
def ku_api(
    ku_database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    razorpay: FakeRazorpay,
    image_host: str,
) -> Iterator[Api]:
    signing = make_signing_key()
    env = {
        **os.environ,
        **razorpay_env(razorpay),
        # The loopback image host is exempt from the private-address rule (tests only).
        "KU_ENHANCEMENT_FETCH_ALLOW_ORIGINS": image_host,
        "KU_DATABASE_URL": ku_database_url,
        "KU_AUTH_PRIVATE_KEY": signing.private_pem,
        "KU_AUTH_KEY_ID": signing.kid,
        "KU_SSO_HS256_SECRET": "schemathesis-sso-secret-0123456789abcdef",
        "KU_GENERATION_OFFLINE": "true",
        "KU_ENHANCEMENT_STORAGE_DIR": str(tmp_path_factory.mktemp("enhancement")),
        "KU_LOG_LEVEL": "ERROR",
        "KU_DB_POOL_SIZE": "2",
        "KU_DB_MAX_OVERFLOW": "2",
        "KU_WRITE_POOL_SIZE": "2",
        "KU_GENERATION_RECORDS_POOL_SIZE": "2",
    }
    with Suite(
        env,
        only=["auth", "ledger", "workspace", "generation", "enhancement", "gateway"],
        free_ports=True,
        migrate=False,
        quiet=True,
        ready_timeout=60,
    ) as suite:
        key = ku_cli(suite.env, "keys", "create", "--app", "penora", "--scopes", SCOPES)
        url = suite.urls["gateway"]
        user = new_user_id()
        ku_cli(suite.env, "users", "create", "--id", user, "--email", f"{user}@example.com")
        wait_for_account(url, key, user)
        headers = {"X-API-Key": key}
        catalog = httpx.get(f"{url}/v1/billing/catalog", headers=headers, timeout=15).json()
        document = merged_document(url)
        image = f"{image_host}/photo.png"
        yield Api(url, document, headers, wired(document, user, catalog["items"], image))


def wired(
    document: dict[str, Any], user: str, catalog: list[dict[str, Any]], image: str
) -> dict[str, Any]:
    """The document with the values some operations must not invent: an order's user and
    item are this suite's (a top-up to order, a plan to subscribe to), an image URL is only
    the loopback image, on behalf of that user, with a type the service knows (its
    multipart and compatibility forms document the type as a free string)."""
    doc = copy.deepcopy(document)
    schemas = doc["components"]["schemas"]
    for name, kind in (("OrderCreate", "topup"), ("SubscriptionCreate", "plan")):
        schemas[name]["properties"]["user_id"] = {"enum": [user]}
        schemas[name]["properties"]["item"] = {
            "enum": sorted(i["id"] for i in catalog if i["kind"] == kind)
        }
    compat = schemas["EnhanceImage"]
    compat["properties"].update(
        inputImageUrl={"enum": [image]}, userId={"enum": [user]}, enhancementType=TYPES
    )
    compat["required"] = sorted({*compat.get("required", []), "inputImageUrl", "userId"})
    submit = doc["paths"]["/v1/enhancement/tasks"]["post"]["requestBody"]["content"]
    for media in submit.values():
        schema = media["schema"]
        schema["properties"].update(user_id={"enum": [user]}, enhancement_type=TYPES)
        if "image_url" in schema["properties"]:  # JSON: the image by URL, not a project
            schema["properties"]["image_url"] = {"enum": [image]}
            schema["properties"].pop("project_code", None)
            schema["required"] = sorted({*schema.get("required", []), "image_url"})
        schema["required"] = sorted({*schema.get("required", []), "user_id"})
    return doc


TYPES = {"enum": ["lighting", "style", "background", "mood", "custom"]}


# One operation of each service: the gateway's document is complete only once it has
# fetched every service's (a slow one is retried): never test a part and pass.
ONE_PATH_EACH = {
    "/v1/users",
    "/v1/ledger/balance",
    "/v1/billing/catalog",
    "/v1/workspace/projects",
    "/v1/generation/models",
    "/v1/enhancement/tasks",
    "/api/unified/user-info",
}


def merged_document(url: str) -> dict[str, Any]:
    for _ in range(30):
        document: dict[str, Any] = httpx.get(f"{url}/openapi.json", timeout=30).json()
        if ONE_PATH_EACH <= set(document["paths"]):
            return document
        time.sleep(1)
    raise AssertionError(f"the gateway's document lacks {ONE_PATH_EACH - set(document['paths'])}")


@dataclass
class Api:
    url: str
    document: dict[str, Any]
    headers: dict[str, str]
    wired: dict[str, Any]

    def operations(self, document: dict[str, Any] | None = None) -> Iterator[Any]:
        """The document's operations, as schemathesis loads them."""
        config = schemathesis.Config.from_dict(
            {
                "base-url": self.url,
                # Only the key given in `headers`: no generated Authorization or `api_key`.
                "generation": {"with-security-parameters": False},
                "request-timeout": 20,
            }
        )
        schema = schemathesis.openapi.from_dict(document or self.document, config=config)
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):  # the document has an operation it cannot test
                raise result.err()
            yield result.ok()

    def failures(self, operation: Any, mode: GenerationMode, examples: int) -> list[str]:
        """What the checks found on `examples` generated requests (the first failure)."""

        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=self.headers, checks=CHECKS)

        return self._run(operation, mode, examples, check)

    def auth_failures(self, operation: Any, examples: int) -> list[str]:
        """Generated requests sent without credentials and with a wrong key: each must
        be refused (401 or 403), never served (2xx) nor a server error (5xx)."""

        def check(case: schemathesis.Case) -> None:
            for label, headers in (("no credentials", {}), ("a wrong key", WRONG_KEY)):
                response = case.call(headers=headers, timeout=20)
                assert response.status_code in (401, 403), (
                    f"{label}: {response.status_code} {response.text[:300]}"
                )

        return self._run(operation, GenerationMode.POSITIVE, examples, check, "auth")

    @staticmethod
    def _run(
        operation: Any,
        mode: GenerationMode,
        examples: int,
        check: Callable[[schemathesis.Case], None],
        label: str | None = None,
    ) -> list[str]:
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[hypothesis.Phase.generate],
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            check(case)

        try:
            run()
        except Unsatisfiable:
            return []  # nothing in this operation can be made invalid (no input, free text)
        except (FailureGroup, Exception) as exc:  # the checks' failures, or the request's error
            return [f"{operation.label} ({label or mode.value}): {exc}".strip()]
        return []


def key(operation: Any) -> tuple[str, str]:
    return operation.method.upper(), operation.path


def test_no_operation_fails_a_check(ku_api: Api) -> None:
    failures = []
    probed = set()
    for operation in ku_api.operations(ku_api.wired):
        if key(operation) in PROBED and operation.definition.raw.get("security") != []:
            failures += ku_api.auth_failures(operation, MAX_EXAMPLES)
            probed.add(key(operation))
        if key(operation) in AUTH_ONLY:
            continue
        failures += ku_api.failures(operation, GenerationMode.POSITIVE, MAX_EXAMPLES)
        if key(operation) not in VALID_ONLY:
            failures += ku_api.failures(operation, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)
    assert not failures, "\n\n".join(failures)
    # Every operation that needs credentials was probed (the webhook needs none).
    assert probed == PROBED - {("POST", "/v1/billing/webhooks/razorpay")}


class TestTheRunCanFail:
    """The same run on a document that lies names the operation and the check."""

    def only(self, ku_api: Api, path: str, method: str, change: Any) -> Any:
        document = copy.deepcopy(ku_api.document)
        change(document["paths"][path][method])
        (operation,) = [
            o for o in ku_api.operations(document) if (o.path, o.method.lower()) == (path, method)
        ]
        return operation

    def test_a_response_unlike_its_schema(self, ku_api: Api):
        def string_balance(op: dict[str, Any]) -> None:
            op["responses"]["200"]["content"]["application/json"]["schema"] = {"type": "string"}

        operation = self.only(ku_api, "/api/unified/health", "get", string_balance)
        (found,) = ku_api.failures(operation, GenerationMode.POSITIVE, 1)
        assert found.startswith("GET /api/unified/health (positive)")
        assert "Response violates schema" in found, found

    def test_an_operation_that_ignores_authentication(self, ku_api: Api):
        def needs_a_key(op: dict[str, Any]) -> None:
            op["security"] = [{"ApiKey": []}]

        operation = self.only(ku_api, "/api/unified/health", "get", needs_a_key)
        (found,) = ku_api.failures(operation, GenerationMode.POSITIVE, 1)
        assert found.startswith("GET /api/unified/health (positive)")
        assert "Expected 401 or 403, got `200 OK`" in found, found

    def test_an_operation_served_without_credentials(self, ku_api: Api):
        def needs_a_key(op: dict[str, Any]) -> None:
            op["security"] = [{"ApiKey": []}]

        operation = self.only(ku_api, "/api/unified/health", "get", needs_a_key)
        (found,) = ku_api.auth_failures(operation, 1)
        assert found.startswith("GET /api/unified/health (auth)")
        assert "no credentials: 200" in found, found
