"""schemathesis fuzzes the gateway's OpenAPI: no input may cause a 5xx.

It generates requests for every documented operation (metadata, readiness,
inference with schema-shaped and malformed bodies, the repository extension)
against a real ``gpufaas up``. Each operation is driven through hypothesis
directly (schemathesis' own pytest plugin does not load under this pytest).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.slow


def test_no_input_causes_a_server_error(server: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v2/models/{name}/infer" for op in operations)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def no_server_error(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        no_server_error()
