"""The coordinator's admin API (FastAPI): clients, jobs, rounds, adapters, privacy, audit.

Build it with :func:`create_app` and serve it with uvicorn (``fedtune coordinator serve`` does).
"""

from fedtune.coordinator.api.app import API_PREFIX, ApiSettings, create_app

__all__ = ["API_PREFIX", "ApiSettings", "create_app"]
