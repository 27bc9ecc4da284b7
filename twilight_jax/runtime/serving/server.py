"""OpenAI-compatible HTTP server over the engine (Starlette on uvicorn).

Routes: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
``"stream": true``), GET /v1/models, /v1/models/{id}, /health and /metrics (Prometheus text).

The engine runs in its own thread; each request gets an asyncio queue that the engine fills
through ``loop.call_soon_threadsafe``, so the event loop never blocks on the model. Every
failure is answered as an OpenAI-style ``{"error": {...}}`` with a 4xx/5xx status, and every
way a request can end (finished, client gone, error) returns its pages to the allocator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from twilight_jax.runtime.serving import protocol
from twilight_jax.runtime.serving.engine import Engine
from twilight_jax.runtime.serving.protocol import APIError
from twilight_jax.runtime.serving.requests import (
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
)

log = logging.getLogger("twilight_jax.serving")

MAX_BODY_BYTES = 8 << 20


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends, however it
    ends (a client that goes away cancels the send), so its cleanup frees the pages at once."""

    def __init__(self, content):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _Submission:
    """The engine requests behind one HTTP request (one per prompt) and their event queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.ids: list[str] = []
        self.unfinished: set[str] = set()

    def submit(self, prompts, params) -> None:
        try:
            for i, prompt in enumerate(prompts):

                def on_event(ev, i=i):
                    # Raises RuntimeError once the loop is closed: the engine then cancels.
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))

                rid = self.engine.submit(prompt, params, on_event)
                self.ids.append(rid)
                self.unfinished.add(rid)
        except InvalidRequestError as e:
            self.cancel()
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        except QueueFullError as e:
            self.cancel()
            raise APIError(429, str(e), code="queue_full") from None
        except EngineStoppedError as e:
            self.cancel()
            raise APIError(503, str(e), code="engine_stopped") from None

    async def next(self) -> tuple[int, RequestOutput]:
        i, ev = await self.queue.get()
        if ev.finished:
            self.unfinished.discard(ev.request_id)
        return i, ev

    def cancel(self) -> None:
        for rid in self.unfinished:
            self.engine.cancel(rid)
        self.unfinished.clear()


def _failure(ev: RequestOutput) -> APIError | None:
    if ev.finish_reason == "error":
        return APIError(500, f"generation failed: {ev.error}", code="generation_error")
    if ev.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled (server shutting down)", code="cancelled")
    return None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServer:
    """The ASGI app for one engine.

    model_name: the id clients pass as ``model`` (``aliases`` are accepted too).
    """

    def __init__(self, engine: Engine, tokenizer, model_name: str, aliases=()):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.served = (model_name, *[a for a in aliases if a != model_name])
        self.created = int(time.time())
        self._owns_engine = False
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if not self.engine.running:
            self.engine.start()
            self._owns_engine = True
        try:
            yield
        finally:
            if self._owns_engine:
                await asyncio.to_thread(self.engine.shutdown)

    # ------------------------------------------------------------------ plumbing
    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        self.engine.metrics.record_rejected(exc.status_code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    async def _internal(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in %s", request.url.path)
        self.engine.metrics.record_rejected(500)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}"))

    def _reject(self, err: APIError) -> Response:
        self.engine.metrics.record_rejected(err.status)
        return _error_response(err)

    async def _read_json(self, request: Request):
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {size} bytes exceeds {MAX_BODY_BYTES} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(
                400,
                f"We could not parse the JSON body of your request ({e}). The body must be a "
                "JSON object.",
                code="invalid_json",
            ) from None

    # ------------------------------------------------------------------ simple routes
    async def health(self, request: Request) -> Response:
        if not self.engine.running:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(
            self.engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def _model_card(self, name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "twilight-jax",
            "max_model_len": self.engine.context_length,
        }

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.served]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.served:
            return self._reject(
                APIError(404, f"The model '{name}' does not exist", code="model_not_found")
            )
        return JSONResponse(self._model_card(name))

    # ------------------------------------------------------------------ generation
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        parse = protocol.parse_chat if chat else protocol.parse_completion
        try:
            body = await self._read_json(request)
            parsed = parse(body, self.tokenizer, self.served, self.engine.context_length)
            sub = _Submission(self.engine)
            sub.submit(parsed.prompts, parsed.params)
        except APIError as e:
            return self._reject(e)
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        created = protocol.now()
        if parsed.stream:
            stream = self._chat_stream if chat else self._completion_stream
            return _EventStream(stream(sub, parsed, rid, created))
        return await self._collect(request, sub, parsed, rid, created, chat)

    async def _collect(self, request, sub: _Submission, parsed, rid, created, chat) -> Response:
        n = len(parsed.prompts)
        texts = [""] * n
        reasons: list[str | None] = [None] * n
        tokens = [0] * n
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while sub.unfinished:
                get = asyncio.ensure_future(sub.next())
                done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return Response(status_code=499)  # nobody is listening any more
                i, ev = get.result()
                err = _failure(ev)
                if err is not None:
                    return self._reject(err)
                texts[i] += ev.text
                tokens[i] = ev.completion_tokens
                if ev.finished:
                    reasons[i] = ev.finish_reason
        finally:
            disconnect.cancel()
            sub.cancel()
        prompt_tokens = sum(len(p) for p in parsed.prompts)
        use = protocol.usage(prompt_tokens, sum(tokens))
        if chat:
            body = protocol.chat_body(rid, created, parsed.model, texts[0], reasons[0], use)
        else:
            choices = [
                {"index": i, "text": t, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
            body = protocol.completion_body(rid, created, parsed.model, choices, use)
        return JSONResponse(body)

    async def _completion_stream(self, sub: _Submission, parsed, rid, created):
        tokens = [0] * len(parsed.prompts)
        try:
            while sub.unfinished:
                i, ev = await sub.next()
                err = _failure(ev)
                if err is not None:
                    yield _sse(err.body())
                    break
                tokens[i] = ev.completion_tokens
                if ev.text or ev.finished:
                    choice = {"index": i, "text": ev.text, "finish_reason": ev.finish_reason}
                    yield _sse(protocol.completion_body(rid, created, parsed.model, [choice], None))
            else:
                if parsed.include_usage:
                    use = protocol.usage(sum(len(p) for p in parsed.prompts), sum(tokens))
                    yield _sse(protocol.completion_body(rid, created, parsed.model, [], use))
            yield "data: [DONE]\n\n"
        finally:
            sub.cancel()

    async def _chat_stream(self, sub: _Submission, parsed, rid, created):
        model = parsed.model
        tokens = 0
        try:
            yield _sse(
                protocol.chat_chunk(rid, created, model, {"role": "assistant", "content": ""})
            )
            while sub.unfinished:
                _, ev = await sub.next()
                err = _failure(ev)
                if err is not None:
                    yield _sse(err.body())
                    break
                tokens = ev.completion_tokens
                if ev.text:
                    yield _sse(protocol.chat_chunk(rid, created, model, {"content": ev.text}))
                if ev.finished:
                    yield _sse(protocol.chat_chunk(rid, created, model, {}, ev.finish_reason))
            else:
                if parsed.include_usage:
                    use = protocol.usage(len(parsed.prompts[0]), tokens)
                    yield _sse(protocol.chat_chunk(rid, created, model, None, usage_=use))
            yield "data: [DONE]\n\n"
        finally:
            sub.cancel()


class ServerThread:
    """Runs an app under uvicorn in a background thread (tests, benchmarks).

    port 0 picks a free port; ``url`` is known once ``start`` returns.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve(server: OpenAIServer, host: str = "127.0.0.1", port: int = 8000, log_level="info"):
    """Serves until interrupted (Ctrl-C / SIGTERM shut down cleanly)."""
    uvicorn.run(server.app, host=host, port=port, log_level=log_level, lifespan="on")
