"""schemathesis against the admin API's OpenAPI document, with an admin token: generated requests
(valid and invalid) must never get a server error, and every response must match the schema
(status code documented, content type, body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fedtune.coordinator.api import ApiSettings, create_app
from fedtune_testing.api import auth, register

pytestmark = pytest.mark.slow

# The schema is read from an app built at import (schemathesis parametrizes at collection); each
# test swaps in the settings of a fresh store (SQLite, and PostgreSQL when configured).
APP = create_app(ApiSettings(ctx=None))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_no_schema_violation(case, api):
    if "bank-a" not in api.tokens:
        register(api, "bank-a")
        register(api, "bank-b")
        api.tokens["bank-a"] = "registered"
    APP.state.settings = api.app.state.settings
    # Excluded: "valid data is accepted". Some rules span fields and JSON Schema cannot state them
    # (min_clients <= len(clients), aggregation 'ffa' iff lora.ffa, max_client_epsilon >= one
    # round's target_epsilon, dp_fedavg needs clip_norm): such requests get a 422 naming the rule.
    case.call_and_validate(headers=auth(api, "admin"), excluded_checks=[positive_data_acceptance])
