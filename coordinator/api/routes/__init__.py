"""The admin API's routes, one module per resource, each an ``APIRouter`` under ``/api/v1``.

A route's ``name=`` is its action: the key of its entry in
:data:`fedtune.compliance.actions.API_ROUTE_ACTIONS` (description and roles), which the app's
middleware authorizes and audits the request under. Routes parse the request, call the services
(:mod:`fedtune.coordinator.api.services`) and record a change in its transaction; ``HTTPException``
is raised here and nowhere below.
"""

from __future__ import annotations

from fastapi import APIRouter

from fedtune.coordinator.api.routes import adapters, audit, clients, jobs, metrics, privacy, reports

ROUTERS: tuple[APIRouter, ...] = tuple(module.router for module in (clients, jobs, adapters, privacy, audit, reports,
                                                                    metrics))
"""Every router of the API, in the order the app includes (and matches) them."""
