"""The e2e tests' shared fixture: a consortium set up as docs/deploy.md says (fedtune_testing.deployment)."""

from fedtune_testing.deployment import deployment  # noqa: F401 - a fixture, found by name
