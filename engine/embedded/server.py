"""The embedded engine replica's app: ``create_app(settings)``.

The lifespan loads the model (transformers + peft, on the engine thread's runner), starts the
engine thread and stops it on shutdown. Errors render in vLLM's shape; a request body that does
not validate (bad JSON included) is a 400 ``BadRequestError``, never a 422 or a 500.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.embedded.async_engine import settle
from engine.errors import BadRequestError, BodyInvalid, EngineInternalError, NotFoundError
from engine.settings import EngineSettings
from shared.errors import TunegateError
from shared.tracing import setup_tracing

log = logging.getLogger(__name__)
T = TypeVar("T")


def _error_response(exc: TunegateError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers or None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """vLLM's text for body validation errors, and the first error's dotted location."""
    errors = exc.errors()
    lines, param = [], None
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        param = param or loc or None
        lines.append(f"  {{'type': {err.get('type')!r}, 'loc': {loc!r}, "
                     f"'msg': {err.get('msg')!r}}}")
    n = len(errors)
    return f"{n} validation error{'s' if n != 1 else ''}:\n" + "\n".join(lines), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TunegateError)
    async def _tunegate(_: Request, exc: TunegateError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(BodyInvalid(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err: TunegateError
        if exc.status_code == 404:
            err = NotFoundError(str(exc.detail))
        elif exc.status_code < 500:
            err = BadRequestError(str(exc.detail))
            err.code = exc.status_code  # type: ignore[assignment]
            return JSONResponse(err.to_dict(), status_code=exc.status_code)
        else:
            err = EngineInternalError(str(exc.detail))
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(EngineInternalError(f"{type(exc).__name__}: {exc}"))


def _build(settings: EngineSettings) -> dict[str, Any]:
    """Load the model and make the engine objects (runs in a worker thread: it is slow)."""
    from transformers import AutoConfig

    from engine.embedded.async_engine import AsyncEngine
    from engine.embedded.metrics import EngineMetrics
    from engine.embedded.runner import ModelRunner
    from engine.embedded.serving import OpenAIServing

    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    config = AutoConfig.from_pretrained(settings.model)
    max_model_len = settings.max_model_len or int(config.max_position_embeddings)
    runner = ModelRunner(settings.model, max_num_seqs=settings.max_num_seqs,
                         max_model_len=max_model_len, dtype=settings.resolved_dtype,
                         impl=settings.impl)
    tokenizer = runner.tokenizer
    metrics = EngineMetrics(settings.model_name)
    engine = AsyncEngine(
        runner, max_num_seqs=settings.max_num_seqs, max_model_len=max_model_len,
        max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
        base_names=[settings.model.name, settings.model_name],
        decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
        metrics=metrics, threads=settings.threads,
    )
    tracing = setup_tracing("tunegate-engine")  # None unless OTEL_* configures it
    if tracing is not None:
        from engine.tracing import EngineTracing, chain

        engine.tracing = EngineTracing(tracing, settings.model_name)
        engine.scheduler.on_step = chain(metrics.on_step, engine.tracing.on_step)
    serving = OpenAIServing(engine, tokenizer, model_name=settings.model_name,
                            max_model_len=max_model_len, max_logprobs=settings.max_logprobs)
    return {"engine": engine, "metrics": metrics, "serving": serving, "tracing": tracing}


async def _in_own_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread of its own that ends with it.

    Not ``asyncio.to_thread``: its pool thread outlives the call, and so would the OpenMP thread
    team torch made on it while loading. Each thread that runs torch ops keeps its own team; once
    a process holds more OpenMP threads than CPUs, libgomp stops spinning between parallel regions
    and every matmul of the engine thread waits for a sleeping worker to wake (a one-row decode
    step went from 27 to 49 ms on the 2-core machine)."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    thread = threading.Thread(target=settle, args=(fut, fn), name="engine-load", daemon=True)
    thread.start()
    result = await asyncio.wrap_future(fut)
    await asyncio.to_thread(thread.join)  # its OpenMP team goes with it
    return result


def create_app(settings: EngineSettings) -> FastAPI:
    from engine.embedded.routers import chat, completions, health, models

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        parts = await _in_own_thread(lambda: _build(settings))
        for name, obj in parts.items():
            setattr(app.state, name, obj)
        app.state.model_name = settings.model_name
        app.state.model_path = settings.model
        app.state.started = int(time.time())
        parts["engine"].start()
        try:
            yield
        finally:
            await asyncio.to_thread(parts["engine"].stop)
            if parts["tracing"] is not None:
                parts["tracing"].shutdown()

    app = FastAPI(title="tunegate embedded engine", lifespan=lifespan)
    install_error_handlers(app)
    for module in (completions, chat, models, health):
        app.include_router(module.router)
    if settings.api_key is not None:
        from engine.auth import EngineAuth

        app.add_middleware(EngineAuth, api_key=settings.api_key.get_secret_value())
    return app
