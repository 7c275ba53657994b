"""The FastAPI application: routes, API-key check, health, metrics, error shape."""

import hmac
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from llama.server import llamacpp_api, openai_api
from llama.server.errors import APIError, install_error_handlers
from llama.server.state import ServerState

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def create_app(
    state: ServerState, api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """The server's app over `state` (whose model may still be loading).

    With `api_key`, every endpoint but /health and /metrics needs `Authorization: Bearer KEY`
    (or `X-Api-Key: KEY`); others get 401. Bodies over `max_body_bytes` get 413.
    """
    app = FastAPI(title="Code Llama server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    install_error_handlers(app, state.metrics.count_error)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the server "
                "was started with (--api_key)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    protected = [Depends(require_key)]
    app.include_router(openai_api.make_router(state, max_body_bytes), dependencies=protected)
    app.include_router(llamacpp_api.make_router(state, max_body_bytes), dependencies=protected)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.engine_ is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        if not state.engine_alive():
            return JSONResponse({"status": "error", "error": state.engine_error}, status_code=503)
        return JSONResponse({"status": "ok", **state.engine_stats()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
