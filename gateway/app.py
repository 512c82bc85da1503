"""The gateway's app factory.

Routers come from ``ROUTER_MODULES``: each module has a ``router`` (an ``APIRouter``) and may have
``lifespan(app, state)``, an async context manager entered after the gateway's own state is open
(for clients that router needs, e.g. an arq pool). Adding a surface is one line in that tuple.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.limits import Guard
from gateway.metrics import Metrics
from gateway.middleware import RequestContext
from gateway.settings import GatewaySettings
from gateway.state import GatewayState
from gateway.tracing import TraceRequests
from shared.errors import InternalError, InvalidRequest, TunegateError, error_body
from shared.tracing import setup_tracing

log = logging.getLogger("tunegate.gateway")

ROUTER_MODULES: tuple[str, ...] = (
    "gateway.routers.health",
    "gateway.routers.openai",
    "gateway.routers.generate",
    "gateway.routers.feedback",
    "gateway.routers.admin_keys",
    "gateway.routers.admin_adapters",
    "gateway.routers.admin_replicas",
    "gateway.routers.files",
    "gateway.routers.fine_tuning",
    "gateway.routers.admin_promotion",
    "gateway.console.router",
)


def create_app(settings: GatewaySettings | None = None,
               router_modules: Sequence[str] = ROUTER_MODULES) -> FastAPI:
    settings = settings or GatewaySettings()
    metrics = Metrics()
    tracing = setup_tracing("tunegate-gateway")  # None unless OTEL_* configures it
    modules = [importlib.import_module(m) for m in router_modules]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await GatewayState.open(settings, metrics)
        state.tracing = tracing
        app.state.tg = state
        try:
            async with contextlib.AsyncExitStack() as stack:
                for m in modules:
                    hook = getattr(m, "lifespan", None)
                    if hook is not None:
                        await stack.enter_async_context(hook(app, state))
                # Everything allocated so far lives as long as the process: keep it out of the
                # cyclic GC's generations so collections stay short (tail latency).
                gc.freeze()
                yield
        finally:
            await state.close()
            if tracing is not None:
                tracing.shutdown()

    docs = settings.api_docs
    app = FastAPI(title="tunegate gateway", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.settings = settings
    for m in modules:
        app.include_router(m.router)
    install_error_handlers(app)
    app.add_middleware(Guard, public=public_paths(settings), body_bytes=settings.max_body_bytes,
                       upload_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContext, metrics=metrics)
    if tracing is not None:  # outermost: its span covers the whole request
        app.add_middleware(TraceRequests, tracing=tracing)
    return app


def public_paths(settings: GatewaySettings) -> frozenset[str]:
    """Paths served without a key: health, readiness, and what the operator opened."""
    paths = {"/health", "/ready"}
    if settings.metrics_access == "open":
        paths.add("/metrics")
    if settings.api_docs:
        paths |= {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    return frozenset(paths)


def _render(err: TunegateError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    @app.exception_handler(TunegateError)
    async def tunegate_error(_: Request, exc: TunegateError) -> JSONResponse:
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return _render(InvalidRequest(f"{param}: {msg}" if param else msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return JSONResponse(error_body(str(exc.detail), type_, code=code),
                            status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _render(InternalError("The gateway failed on this request."))


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory gateway.app:app_from_env`` (several workers)."""
    return create_app(GatewaySettings())
