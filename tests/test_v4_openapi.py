"""server/v4/openapi.yaml: schemathesis generates requests from the document (valid and
invalid bodies and query parameters) and sends them over real HTTP to the real shim. Every
answer must be HTTP 200 with the documented envelope and schema; never a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from server.v4 import http
from tests.support.threaded import ServiceInThread
from tests.v4_helpers import assert_envelope, envelope_query

pytest_plugins = ["tests.v4_fixtures"]

DOCUMENT = Path(http.__file__).parent / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
OPERATIONS = [
    result.ok()
    for result in SCHEMA.get_all_operations()
    if isinstance(result, Ok) and result.ok().method.upper() == "POST"
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_document_lists_every_command() -> None:
    """The document describes exactly the commands the shim serves."""
    from server.v4.commands import COMMANDS

    assert {op.path for op in OPERATIONS} == {f"/v4/{name}" for name in COMMANDS}


def test_generated_requests_get_the_envelope(threaded_shim: ServiceInThread) -> None:
    """Generated requests (bodies in and out of the schema; half with a valid envelope so
    they reach the commands) are answered 200 with the documented envelope."""
    base_url = f"http://127.0.0.1:{threaded_shim.http_port}"
    cases = st.one_of(
        *(op.as_strategy(generation_mode=mode) for op in OPERATIONS for mode in GenerationMode)
    )
    session = requests.Session()

    @given(case=cases, authenticated=st.booleans())
    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def exchange(case: Case[APIOperation[Any, Any, Any, Any]], authenticated: bool) -> None:
        if authenticated:
            case.query = envelope_query()
        response = case.call(base_url=base_url, session=session, timeout=10)
        assert response.status_code == 200, response.text
        assert_envelope(response.json())
        case.validate_response(response, checks=CHECKS)

    try:
        exchange()
    finally:
        session.close()
