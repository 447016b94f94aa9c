"""A bounded property-based fuzz of the live tiny-model server against its own /openapi.json
(schemathesis): every response conforms to the document, none is a 5xx, none hangs, invalid input is
refused, and the server still answers correctly afterwards.

The cases come from schemathesis' strategies and run under Hypothesis directly: its pytest plugin
(`schemathesis.pytest.from_fixture`) does not run under pytest 9.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 20  # per route and mode: about 400 requests in all, a minute or two on the tiny model


@pytest.fixture(scope="module")
def operations(tiny_server):
    schema = schemathesis.openapi.from_url(f"{tiny_server.base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_every_route_conforms_to_its_document(operations, mode):
    checks = CHECKS + ([negative_data_rejection] if mode is schemathesis.GenerationMode.NEGATIVE else [])
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions", "POST /invocations"}
    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET without parameters has no invalid input to send

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,  # the same cases on every machine: none replayed from a local example database
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case):
            case.call_and_validate(checks=checks, timeout=60)

        conforms()


def test_the_server_still_answers_after_the_fuzz(tiny_server):
    body = {"model": tiny_server.model, "prompt": "after the fuzz", "max_tokens": 4, "ignore_eos": True}
    response = requests.post(f"{tiny_server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
