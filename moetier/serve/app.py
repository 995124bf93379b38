"""The HTTP server: FastAPI routes, OpenAI-style errors, lifespan of the engine thread, uvicorn.

    moetier serve --model /path/to/checkpoint --port 8000

Every error, including FastAPI's own validation and routing errors, is answered with OpenAI's
body `{"error": {"message", "type", "param", "code"}}`; bad input is a 400 (404 for an unknown
model or route), never a 5xx. SIGINT/SIGTERM stop accepting connections, let requests in flight
finish (up to --shutdown-timeout seconds, then they are cancelled and aborted), and stop the
engine thread.
"""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moetier import __version__
from moetier.engine.engine import Engine
from moetier.errors import MoetierError
from moetier.serve import protocol as p
from moetier.serve.async_engine import AsyncEngine
from moetier.serve.metrics import ServerMetrics
from moetier.serve.openai_api import OpenAIServing

log = logging.getLogger(__name__)


def _error_response(error: p.APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> p.APIError:
    errors = exc.errors()
    if not errors:
        return p.APIError(400, "invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return p.APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
    if first.get("type") == "missing" and not loc:
        return p.APIError(400, "the request needs a JSON body", None, "missing_body")
    if not loc and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return p.APIError(400, "the request body must be a JSON object (sent as Content-Type: application/json)",
                          None, "invalid_body")
    param = ".".join(loc) or None
    messages = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg', '')}"
                for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return p.APIError(400, "invalid request: " + "; ".join(messages) + more, param, "invalid_value")


class _CountRequests:
    """ASGI middleware: moetier_requests_total{endpoint, status} for /v1 routes."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"
        counted = False

        async def counting_send(message):
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not counted:  # cancelled or failed before any response started
                self.metrics.count_request(endpoint, 499)


def build_app(async_engine: AsyncEngine, served_model_name: str) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine thread."""
    metrics = async_engine.metrics
    serving = OpenAIServing(async_engine, served_model_name)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await async_engine.stop()

    app = FastAPI(title="moetier", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for Mixture-of-Experts models")

    @app.exception_handler(p.APIError)
    async def api_error(_request: Request, exc: p.APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(MoetierError)
    async def moetier_error(_request: Request, exc: MoetierError):
        return _error_response(p.APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(p.APIError(exc.status_code, str(exc.detail), None, code))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception):
        log.exception("internal error")
        return _error_response(p.APIError(500, f"internal error: {type(exc).__name__}", None, None, "server_error"))

    @app.get("/health")
    async def health():
        if not async_engine.alive:
            return _error_response(p.APIError(503, "the engine is not running", None, None, "server_error"))
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        text = metrics.render(async_engine.queue_depth, async_engine.num_running, async_engine.alive)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=p.ModelList)
    async def models():
        return serving.models()

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion)
    async def chat_completions(body: p.ChatCompletionRequest, raw: Request):
        return await serving.chat(body, raw)

    @app.post("/v1/completions", response_model=p.Completion)
    async def completions(body: p.CompletionRequest, raw: Request):
        return await serving.completions(body, raw)

    app.add_middleware(_CountRequests, metrics=metrics)
    return app


def uvicorn_server(app: FastAPI, host: str, port: int, shutdown_timeout: float, access_log: bool = False,
                   log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=30)
    return uvicorn.Server(config)


def serve(engine: Engine, served_model_name: str, host: str, port: int, max_queue: int,
          shutdown_timeout: float = 30.0, access_log: bool = False) -> None:
    """Runs until SIGINT/SIGTERM (uvicorn's handlers), then shuts down gracefully."""
    app = build_app(AsyncEngine(engine, max_queue), served_model_name)
    uvicorn_server(app, host, port, shutdown_timeout, access_log).run()
