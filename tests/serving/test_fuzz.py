"""The served API under a property-based fuzzer (schemathesis, from the app's own
`/openapi.json`, with the token): no input is a 5xx, and every refusal is a JSON body
that names what was wrong. The teacher's OpenAI routes are left to vLLM's own validation:
each valid call there generates text, which would cost minutes here."""

from __future__ import annotations

import pytest
import schemathesis
from conftest import TOKEN, ServedApp
from hypothesis import HealthCheck, given, settings

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # the session's served app
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served_schema(served_app: ServedApp) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_url(f"{served_app.url}/openapi.json", headers=AUTH)
    return loaded.exclude(path_regex="^/v1/(chat/)?completions$")


def test_no_input_is_a_server_error_and_every_refusal_names_the_problem(
    served_schema: schemathesis.BaseSchema,
) -> None:
    """300 cases drawn over every operation of the schema, the same ones on every run."""

    @given(case=served_schema.as_strategy())
    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def answers(case: schemathesis.Case) -> None:
        response = case.call(headers=AUTH, timeout=60)
        assert response.status_code < 500, (case.method, case.path, response.text[:500])
        if response.status_code >= 400:
            detail = response.json()["detail"]
            assert detail, response.text
            if response.status_code == 422 and isinstance(detail, list):
                assert all(error["loc"] and error["msg"] for error in detail), detail

    answers()
