"""How errors become the admin API's responses: always ``{"detail": "..."}`` with the status.

* a request that fails validation: 422 whose ``detail`` names the first bad field, with every error
  under ``errors``;
* ``HTTPException`` (raised only by routes and the middleware): its status and detail;
* the services' errors (:mod:`.services.errors`): :data:`SERVICE_ERROR_STATUS` says which status each
  gets; the message is the detail.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedtune.coordinator.api.services.errors import Conflict, NotFound

SERVICE_ERROR_STATUS: dict[type[Exception], int] = {NotFound: 404, Conflict: 409}


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": "?", "message": "invalid request"}
        return JSONResponse(status_code=422, content=jsonable_encoder(
            {"detail": f"{first['field']}: {first['message']}", "errors": errors}))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail},
                            headers=getattr(exc, "headers", None))

    for error, status in SERVICE_ERROR_STATUS.items():
        app.add_exception_handler(error, _answer_with(status))


def _answer_with(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    return handler
