"""The HTTP side of `tformer serve`: an OpenAI-compatible API over one batch scheduler per model.

create_app(models, settings) builds the FastAPI app. Routes:

- `POST /v1/chat/completions`, `POST /v1/completions`: streamed as server-sent events
  (`data: {...}` chunks, then `data: [DONE]`) or answered whole;
- `GET /v1/models` (and `/v1/models/{id}`), `GET /metrics` (JSON, or `?format=prometheus`);
- `GET /health` and `GET /` (the web chat page), open to anyone.

With an API key every `/v1` route and `/metrics` need `Authorization: Bearer KEY`. Bodies are
read whole up to a limit before anything parses them (413 beyond it), and every request leaves
one line on the "tformer.serve" logger (the command prints it; the library prints nothing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from tformer_cli import __version__
from tformer_cli.serve.batching import Event, Job, QueueFull, Scheduler
from tformer_cli.serve.errors import APIError, install_error_handlers, invalid_body
from tformer_cli.serve.prompts import (
    Plan,
    ServedModel,
    ServeSettings,
    plan_chat,
    plan_completion,
)
from tformer_cli.serve.schemas import ChatCompletionRequest, CompletionRequest
from tformer_cli.units import human_bytes

log = logging.getLogger("tformer.serve")


class ServerState:
    """The loaded models, their schedulers, the settings and the request counts of one app."""

    def __init__(self, models: list[ServedModel], settings: ServeSettings):
        if not models:
            raise ValueError("serve at least one model")
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.settings = settings
        self.schedulers = {
            m.name: Scheduler(m.run.model, m.run.tokenizer, settings.max_batch, settings.max_queue)
            for m in models
        }
        self.started = time.time()
        self.statuses: Counter[int] = Counter()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The decoding threads run while the app does; at shutdown they end."""
        for scheduler in self.schedulers.values():
            scheduler.start()
        try:
            yield
        finally:
            for scheduler in self.schedulers.values():
                await run_in_threadpool(scheduler.stop)

    def model(self, name: str | None) -> ServedModel:
        """The model a request names (the first one loaded when it names none), or 404."""
        if name is None:
            return self.models[self.default]
        if name not in self.models:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server has {', '.join(self.models)}",
                param="model",
                code="model_not_found",
            )
        return self.models[name]

    def authorize(self, request: Request) -> None:
        """Nothing without an API key; with one, `Authorization: Bearer KEY` or 401."""
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.strip().encode(), key.encode()
        ):
            raise APIError(
                401,
                "a valid API key is needed: send the header Authorization: Bearer KEY",
                code="invalid_api_key",
            )

    def metrics(self) -> dict:
        """Requests in flight, batch sizes and tokens/s, over all models and per model."""
        models = {name: s.stats.snapshot() for name, s in self.schedulers.items()}
        total = {
            key: sum(m[key] for m in models.values())
            for key in ("queued", "running", "batch_size", "generated_tokens", "tokens_per_s")
        }
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests_in_flight": total["queued"] + total["running"],
            **total,
            "peak_batch_size": max(m["peak_batch_size"] for m in models.values()),
            "responses": {str(k): v for k, v in sorted(self.statuses.items())},
            "models": models,
        }


def create_app(models: list[ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving these models (their decoding threads start with the app)."""
    state = ServerState(models, settings or ServeSettings())
    app = FastAPI(
        title="tformer serve",
        version=__version__,
        lifespan=state.lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the server works offline
        redoc_url=None,
    )
    app.state.tformer = state
    install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=state.settings.max_body_bytes)
    app.add_middleware(_AccessLog, state=state)  # added last: the outermost, it sees every reply
    app.include_router(_api_routes(state), dependencies=[Depends(state.authorize)])
    app.include_router(_open_routes(state))
    return app


def _open_routes(state: ServerState) -> APIRouter:
    router = APIRouter()
    page = resources.files("tformer_cli.serve").joinpath("static/index.html").read_text("utf-8")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        """The web chat page."""
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """No icon (browsers ask for one)."""
        return Response(status_code=204)

    @router.get("/health")
    async def health() -> dict:
        """Whether the server answers, and its models' names."""
        return {"status": "ok", "models": list(state.models)}

    return router


def _api_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict:
        """The loaded models, as OpenAI lists models."""
        return {"object": "list", "data": [m.describe() for m in state.models.values()]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        """One model (404 for a name the server does not have)."""
        return state.model(model_id).describe()

    @router.get("/metrics")
    async def metrics(format: str = "json") -> Response:
        """Requests in flight, batch sizes, tokens/s: JSON, or ?format=prometheus."""
        if format == "prometheus":
            return PlainTextResponse(_prometheus(state.metrics()))
        return JSONResponse(state.metrics())

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """A reply to a conversation, rendered as `tformer chat` renders it."""
        req = await _parse(request, ChatCompletionRequest)
        model = state.model(req.model)
        plan = await run_in_threadpool(plan_chat, model, req, state.settings)
        shape = _Shape("chat", model.name, strip=model.mode == "plain")
        return await _answer(request, state, model, plan, req, shape)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """The continuation of a prompt, as `tformer generate` continues it."""
        req = await _parse(request, CompletionRequest)
        model = state.model(req.model)
        plan = await run_in_threadpool(plan_completion, model, req, state.settings)
        shape = _Shape("completion", model.name, echo=req.echo)
        return await _answer(request, state, model, plan, req, shape)

    return router


async def _parse(request: Request, schema: type[BaseModel]):
    """The body checked against the schema: 400 for JSON that does not parse, 422 otherwise."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise invalid_body(list(e.errors())) from None


# -- a request's rows, as the handler sees them ---------------------------------------------------


class _Trim:
    """A base model's reply without its leading and trailing whitespace, as `tformer chat` strips
    it, given out piece by piece: whitespace waits until text follows it."""

    def __init__(self):
        self.started, self.held = False, ""

    def __call__(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


class _Reply:
    """One request's job: the scheduler's events in, each choice's text, tokens and finish."""

    def __init__(self, plan: Plan, timeout: float, strip: bool):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.job = Job(plan.rows, self._deliver, timeout)
        self.plan = plan
        n = len(plan.rows)
        self.texts = [""] * n
        self.tokens = [0] * n
        self.finish: list[str | None] = [None] * n
        self.trims = [_Trim() for _ in range(n)] if strip else None
        self.open = n
        self.gone = False  # the client disconnected
        self.done_at: float | None = None

    def _deliver(self, events: list[Event]) -> None:  # on the scheduler's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    async def _watch(self, receive) -> None:
        """Cancel the job as soon as the client disconnects, wherever the handler is."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.job.cancel()
        self.queue.put_nowait([])  # wakes pieces(), which sees that the client is gone

    async def pieces(self, receive) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason once it ended) until every choice has ended.

        Stops early when the client disconnects; an error of the job is raised as APIError.
        """
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            while self.open and not self.gone:
                for event in await self.queue.get():
                    if piece := self._take(event):
                        yield piece
        finally:
            watcher.cancel()
            self.done_at = time.monotonic()
            if self.open:
                self.job.cancel()

    def _take(self, event: Event) -> tuple[int, str, str | None] | None:
        if event.error is not None:
            self.open = 0
            raise APIError(event.status, event.error)
        i = event.index
        text = self.trims[i](event.text) if self.trims else event.text
        self.texts[i] += text
        self.tokens[i] = event.tokens
        if event.finish:
            self.finish[i] = event.finish
            self.open -= 1
        return (i, text, event.finish) if text or event.finish else None

    def usage(self) -> dict:
        """OpenAI's token counts: the prompts once, every choice's completion tokens."""
        completion = sum(self.tokens)
        prompt = self.plan.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class _Shape:
    """The JSON of one endpoint: chat completions or text completions, whole or in chunks."""

    def __init__(self, kind: str, model: str, strip: bool = False, echo: bool = False):
        self.kind, self.model, self.strip, self.echo = kind, model, strip, echo
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def head(self, chunk: bool) -> dict:
        """The fields every answer and chunk starts with."""
        kinds = {"chat": "chat.completion", "completion": "text_completion"}
        obj = kinds[self.kind] + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool = False):
        """One streamed chunk of a choice: new text and/or its finish reason."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None}
        return {**self.head(True), "choices": [{**choice, "finish_reason": finish}]}

    def whole(self, reply: _Reply) -> dict:
        """The answer of a request that does not stream."""
        choices = []
        for i, (text, finish) in enumerate(zip(reply.texts, reply.finish, strict=True)):
            if self.kind == "chat":
                choice = {"message": {"role": "assistant", "content": text}}
            else:
                shown = self.echo_text(reply, i) + text
                choice = {"text": shown}
            choices.append({"index": i, **choice, "logprobs": None, "finish_reason": finish})
        return {**self.head(False), "choices": choices, "usage": reply.usage()}

    def echo_text(self, reply: _Reply, index: int) -> str:
        """The prompt that choice index continues, when the request asked for `echo`."""
        if not self.echo:
            return ""
        per_prompt = len(reply.plan.rows) // len(reply.plan.prompt_texts)
        return reply.plan.prompt_texts[index // per_prompt]


async def _answer(
    request: Request,
    state: ServerState,
    model: ServedModel,
    plan: Plan,
    req: ChatCompletionRequest | CompletionRequest,
    shape: _Shape,
) -> Response:
    """Queue the rows; stream their chunks, or wait for them and answer whole."""
    reply = _Reply(plan, state.settings.timeout, shape.strip)
    try:
        state.schedulers[model.name].submit(reply.job)
    except QueueFull as e:
        raise APIError(
            503, f"the server is busy ({e}); try again shortly", code="overloaded"
        ) from None
    request.state.reply, request.state.model = reply, model.name
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        events = _sse(reply, shape, request.receive, usage)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    async for _ in reply.pieces(request.receive):
        pass
    if reply.gone:
        return Response(status_code=499)  # nobody is there to read it
    return JSONResponse(shape.whole(reply))


def _data(obj: dict | str) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {text}\n\n"


async def _sse(reply: _Reply, shape: _Shape, receive, usage: bool) -> AsyncIterator[str]:
    """The chunks of a streamed answer as server-sent events, then `data: [DONE]`."""
    for i in range(len(reply.plan.rows)):
        yield _data(shape.chunk(i, shape.echo_text(reply, i), None, first=True))
    try:
        async for index, text, finish in reply.pieces(receive):
            yield _data(shape.chunk(index, text, finish))
    except APIError as e:
        yield _data(e.body())
    else:
        if usage:
            yield _data({**shape.head(True), "choices": [], "usage": reply.usage()})
    yield _data("[DONE]")


def _prometheus(metrics: dict) -> str:
    """The metrics in Prometheus' text format, one gauge or counter per figure and model."""
    lines = []
    names = {
        "queued": "gauge",
        "running": "gauge",
        "batch_size": "gauge",
        "peak_batch_size": "gauge",
        "requests": "counter",
        "prompt_tokens": "counter",
        "generated_tokens": "counter",
        "steps": "counter",
        "tokens_per_s": "gauge",
    }
    for name, kind in names.items():
        lines.append(f"# TYPE tformer_{name} {kind}")
        for model, figures in metrics["models"].items():
            label = json.dumps(model)
            lines.append(f"tformer_{name}{{model={label}}} {figures[name]}")
    return "\n".join(lines) + "\n"


# -- middleware ----------------------------------------------------------------------------------


class _BodyLimit:
    """Reads a request's body whole, up to the limit (413 beyond it), before the app sees it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_big = APIError(
            413,
            f"the request body is over the limit of {human_bytes(self.limit)}",
            code="request_too_large",
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await too_big.response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await too_big.response()(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replay():
            """The body read above, then what the server sends next (a disconnect)."""
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect, when it comes
            sent = True
            return body

        await self.app(scope, replay, send)


class _AccessLog:
    """One line per request on the "tformer.serve" logger, when its answer has been sent: the
    status and time, and for completions the tokens, time to first token and tokens/s."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 0
        scope.setdefault("state", {})

        async def watched(message) -> None:
            """send(), noting the status on the way."""
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.state.statuses[status or 499] += 1
            log.info("%s", _access_line(scope, status, time.monotonic() - start))


def _access_line(scope, status: int, seconds: float) -> str:
    client = scope.get("client") or ("-", 0)
    line = (
        f'{client[0]} "{scope["method"]} {scope["path"]}" {status or "-"} {seconds * 1000:.0f} ms'
    )
    reply: _Reply | None = scope["state"].get("reply")
    if reply is None:
        return line
    job, tokens = reply.job, sum(reply.tokens)
    line += f" model={scope['state'].get('model')} prompt={reply.plan.prompt_tokens} new={tokens}"
    if job.first_token_at is not None:
        line += f" first={(job.first_token_at - job.created) * 1000:.0f} ms"
        decoding = (reply.done_at or time.monotonic()) - job.first_token_at
        if tokens > 1 and decoding > 0:
            line += f" {(tokens - 1) / decoding:.1f} tok/s"
    if reply.gone:
        line += " (client left)"
    elif job.timed_out:
        line += " (time limit)"
    return line
