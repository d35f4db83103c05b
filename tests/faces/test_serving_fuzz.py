"""The search service fuzzed from its own OpenAPI schema (schemathesis) over real HTTP: uvicorn on 127.0.0.1 serving
the champion v3 and its upgraded gallery, with an admin token. Bounded in count and time: a few dozen examples per
operation (``MAX_EXAMPLES``), derandomized, without the shrink phase; a few seconds once the world is built.

Checked on every answer: no 5xx; the status code, content type and body are those the schema declares; every 4xx
carries a one-line string ``detail``; an admin endpoint answers 401 when the token is left out or wrong.
"""

from __future__ import annotations

from collections.abc import Iterator

import factories
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from serving_checks import TOKEN, running, v3_sets_root

from fct_registry.serving.app import create_app

MAX_EXAMPLES = 40
MAX_UPLOAD = 64 * 1024
MAX_K = 100
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def one_line_detail(ctx, response, case) -> bool | None:
    """A schemathesis check: a 4xx answer is JSON ``{"detail": "<one line>"}``."""
    if 400 <= response.status_code < 500:
        detail = response.json().get("detail")
        assert isinstance(detail, str) and detail and "\n" not in detail and "\r" not in detail, (
            f"{response.status_code} without a one-line detail: {response.text[:300]}")
    return None


CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, ignored_auth, negative_data_rejection, one_line_detail]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Iterator[str]:
    world = factories.shared_world(tmp_path_factory)
    app = create_app(world.registry, v3_sets_root(world, tmp_path_factory.mktemp("fuzzed")),
                     max_upload_bytes=MAX_UPLOAD, max_k=MAX_K, admin_token=TOKEN)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


OPERATIONS = ["GET /health", "GET /info", "POST /search", "POST /reload"]
RUNS = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [("POST /search", GenerationMode.NEGATIVE)]
"""Schema-valid requests for every operation; schema-invalid ones where there is an input to break (the
admin endpoint's only input, its token, is probed by ``ignored_auth`` on every call)."""


def test_every_operation_is_fuzzed(api_schema):
    assert sorted(op.ok().label for op in api_schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), RUNS, ids=[f"{label}-{mode.value}" for label, mode in RUNS])
def test_the_api_answers_schema_generated_requests_as_declared(api_schema, base_url, label, mode):
    operation = api_schema.find_operation_by_label(label)
    seen: dict[int, int] = {}

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, print_blob=False, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def answers_as_declared(case) -> None:
        response = case.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    answers_as_declared()
    if (label, mode) == ("POST /search", GenerationMode.POSITIVE):  # the schema leads the fuzzer to real searches
        assert seen.get(200, 0) >= 5 and sum(seen.values()) >= MAX_EXAMPLES // 2, seen


def test_the_schema_describes_both_search_bodies_and_the_admin_token(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as http:
        spec = http.get("/openapi.json").json()
    search = spec["paths"]["/search"]["post"]
    body = search["requestBody"]["content"]
    embedding = body["application/json"]["schema"]["properties"]
    dim = factories.DIMS["v3"]
    assert (embedding["embedding"]["minItems"], embedding["embedding"]["maxItems"]) == (dim, dim)
    assert embedding["model"]["anyOf"][0]["type"] == "string"
    image = body["multipart/form-data"]["schema"]
    assert image["required"] == ["image"] and image["properties"]["image"]["format"] == "binary"
    assert image["properties"]["k"]["maximum"] == 50  # min(max_k, gallery size)
    assert {"400", "409", "413", "415", "422"} <= set(search["responses"])
    assert search["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    reload = spec["paths"]["/reload"]["post"]
    assert reload["security"] == [{"adminToken": []}] and "401" in reload["responses"]
    assert spec["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
