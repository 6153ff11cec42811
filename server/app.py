"""The HTTP application: llama-server's and OpenAI's routes over one Engine driven by the batching scheduler.

`create_app(settings)` returns a Starlette ASGI app. The model loads in a background thread when the app
starts (`/health` answers 503 until then), so a load balancer sees the server come up before the weights are
ready. Request handlers only validate, tokenize and shape JSON; every engine call happens on the scheduler
thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from ternary.engine.engine import Engine, set_threads
from ternary.engine.sampling import Sampler, SamplingParams
from ternary.formats.tokenizer import StreamDecoder
from ternary.server import params
from ternary.server.chat_template import ChatTemplate
from ternary.server.errors import APIError
from ternary.server.metrics import Metrics
from ternary.server.middleware import ApiKeyMiddleware, MetricsMiddleware
from ternary.server.openai_shapes import ResponseShaper, sse
from ternary.server.scheduler import Delta, Event, Failed, Finished, Job, Scheduler, TokenLogprob
from ternary.server.text_stream import TextStream

from ternary import __version__

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 16 << 20
PUBLIC_PATHS = ("/", "/index.html", "/health", "/v1/health", "/models", "/v1/models")


@dataclass(frozen=True)
class ServerSettings:
    """What `ternary-serve` was started with (llama-server's flag names in the CLI)."""

    model: str
    threads: int | None = None
    n_ctx: int | None = None  # per slot; None: the model's training context
    n_slots: int = 1
    batch_size: int = 256
    max_waiting: int = 64
    api_key: str | None = None
    alias: str | None = None


EngineFactory = Callable[[ServerSettings], Any]


def default_engine_factory(settings: ServerSettings) -> Any:
    return Engine(settings.model, threads=settings.threads, n_ctx=settings.n_ctx, n_slots=settings.n_slots)


@dataclass
class Served:
    """The loaded model and everything derived from it once."""

    engine: Any
    scheduler: Scheduler
    template: ChatTemplate
    model_id: str
    names: frozenset[str]
    n_ctx: int
    n_vocab: int

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def encode(self, text: str) -> list[int]:
        """Prompt text to ids: special tokens parsed; BOS added when the model wants one and it is missing."""
        tok = self.tokenizer
        ids = list(tok.encode(text, add_bos=False, parse_special=True))
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids


class ServerState:
    """Shared by all handlers: settings, metrics, and the model once it has loaded."""

    def __init__(self, settings: ServerSettings, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.metrics = Metrics()
        self.served: Served | None = None
        self.load_error: str | None = None
        self.started = time.time()

    def load(self) -> None:
        """Load the engine (it compiles its kernels), start the scheduler; runs on a background thread."""
        s = self.settings
        t0 = time.perf_counter()
        engine = self.engine_factory(s)
        tok = engine.tokenizer
        metadata = _metadata(s.model)
        template = ChatTemplate(
            metadata.get("tokenizer.chat_template"),
            bos_token=_token_text(tok, tok.bos_id),
            eos_token=_token_text(tok, tok.eos_id),
        )
        scheduler = Scheduler(
            engine,
            frozenset(tok.eog_ids),
            batch_size=s.batch_size,
            max_waiting=s.max_waiting,
            observer=self.metrics,
            # numba.set_num_threads is per thread: apply the engine's count where eval_batch will run
            thread_setup=partial(set_threads, engine.threads) if hasattr(engine, "threads") else None,
        )
        scheduler.start()
        model_id = s.alias or Path(s.model).name
        names = {model_id, s.model, Path(s.model).name, Path(s.model).stem}
        if isinstance(metadata.get("general.name"), str):
            names.add(metadata["general.name"])
        self.served = Served(
            engine=engine,
            scheduler=scheduler,
            template=template,
            model_id=model_id,
            names=frozenset(names),
            n_ctx=int(engine.n_ctx),
            n_vocab=int(tok.n_vocab),
        )
        log.info(
            "model %s loaded in %.1f s (%d slots x %d context)",
            model_id,
            time.perf_counter() - t0,
            engine.n_slots,
            engine.n_ctx,
        )

    def ready(self) -> Served:
        if self.served is None:
            if self.load_error:
                raise APIError(500, f"The model failed to load: {self.load_error}", type="server_error")
            raise APIError(503, "Loading model", type="unavailable_error", code="loading")
        return self.served

    def shutdown(self) -> None:
        if self.served is not None:
            self.served.scheduler.stop()


def _metadata(path: str) -> dict[str, Any]:
    """The GGUF's general.* and chat-template metadata (the vocabulary arrays stay in the tokenizer)."""
    from ternary.formats.reader import GGUFFile

    with GGUFFile(path) as f:
        return {k: v for k, v in f.metadata.items() if not k.startswith("tokenizer.ggml.")}


def _token_text(tok: Any, token: int | None) -> str:
    return "" if token is None else tok.token_bytes(token).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- handlers


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _json_body(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes).", code="body_too_large")
    return params.parse_json_body(await request.body())


async def health(request: Request) -> Response:
    state = _state(request)
    if state.served is not None:
        return JSONResponse({"status": "ok"})
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)
    return JSONResponse(APIError(503, "Loading model", type="unavailable_error", code="loading").body(), 503)


async def models(request: Request) -> Response:
    served = _state(request).ready()
    meta = {"n_ctx": served.n_ctx, "n_vocab": served.n_vocab, "n_slots": served.scheduler.n_slots}
    card = {
        "id": served.model_id,
        "object": "model",
        "created": int(_state(request).started),
        "owned_by": "ternary",
        "meta": meta,
    }
    return JSONResponse({"object": "list", "data": [card]})


async def props(request: Request) -> Response:
    state = _state(request)
    served = state.ready()
    defaults = SamplingParams()
    return JSONResponse(
        {
            "default_generation_settings": {
                "n_ctx": served.n_ctx,
                "params": {
                    "temperature": defaults.temperature,
                    "top_k": defaults.top_k,
                    "top_p": defaults.top_p,
                    "min_p": defaults.min_p,
                    "repeat_penalty": defaults.repeat_penalty,
                    "repeat_last_n": defaults.repeat_last_n,
                    "dry_multiplier": defaults.dry.multiplier,
                    "dry_base": defaults.dry.base,
                    "dry_allowed_length": defaults.dry.allowed_length,
                    "dry_penalty_last_n": defaults.dry.penalty_last_n,
                    "dry_sequence_breakers": list(defaults.dry.sequence_breakers),
                },
            },
            "total_slots": served.scheduler.n_slots,
            "busy_slots": served.scheduler.n_active,
            "queued_requests": served.scheduler.n_waiting,
            "max_queued_requests": served.scheduler.max_waiting,
            "model_path": state.settings.model,
            "model_alias": served.model_id,
            "chat_template": served.template.source or "",
            "chat_template_is_fallback": served.template.is_fallback,
            "build_info": f"ternary {__version__}",
        }
    )


async def tokenize(request: Request) -> Response:
    served = _state(request).ready()
    body = await _json_body(request)
    content = params.parse_text_field(body, "content")
    add_special = params.parse_bool_field(body, "add_special", False)
    with_pieces = params.parse_bool_field(body, "with_pieces", False)
    tok = served.tokenizer

    def run() -> list[int]:
        return (
            served.encode(content)
            if add_special
            else list(tok.encode(content, add_bos=False, parse_special=True))
        )

    ids = await run_in_threadpool(run)
    if with_pieces:
        pieces = [{"id": t, "piece": tok.token_bytes(t).decode("utf-8", errors="replace")} for t in ids]
        return JSONResponse({"tokens": pieces})
    return JSONResponse({"tokens": ids})


async def detokenize(request: Request) -> Response:
    served = _state(request).ready()
    body = await _json_body(request)
    if "tokens" not in body:
        raise APIError(
            400, "Missing required parameter: 'tokens'.", param="tokens", code="missing_required_parameter"
        )
    ids = params.token_ids(body["tokens"], "tokens", served.n_vocab)
    return JSONResponse({"content": served.tokenizer.decode(ids)})


async def metrics(request: Request) -> Response:
    state = _state(request)
    gauges: dict[str, tuple[str, float]] = {
        "model_loaded": ("1 once the model is ready.", int(state.served is not None))
    }
    if state.served is not None:
        sch = state.served.scheduler
        gauges["slots_total"] = ("KV-cache slots (--parallel).", sch.n_slots)
        gauges["requests_processing"] = ("Requests holding a slot.", sch.n_active)
        gauges["requests_deferred"] = ("Requests waiting for a slot.", sch.n_waiting)
    text = state.metrics.render(gauges)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


class _Channel:
    """Events from the scheduler thread into this request's event loop; `None` means the client left."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


async def _generate(request: Request, chat: bool) -> Response:
    served = _state(request).ready()
    body = await _json_body(request)
    params.check_model(body, served.names)
    opts = params.parse_generation_options(body, chat=chat, n_ctx=served.n_ctx, n_vocab=served.n_vocab)
    stop = opts.stop
    if chat:
        messages = params.parse_messages(body)
        prompt = await run_in_threadpool(lambda: served.encode(served.template.render(messages)))
        stop = stop + served.template.stop_strings
    else:
        given = params.parse_prompt(body, served.n_vocab)
        prompt = given if isinstance(given, list) else await run_in_threadpool(served.encode, given)
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    ctx = min(opts.num_ctx or served.n_ctx, served.n_ctx)
    if len(prompt) >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your "
            f"{'messages' if chat else 'prompt'} resulted in {len(prompt)} tokens, leaving no room for the "
            f"completion. Please reduce the length of the {'messages' if chat else 'prompt'}.",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )

    channel = _Channel()
    job = Job(
        prompt=prompt,
        max_new=min(opts.max_tokens or ctx, ctx - len(prompt)),
        sampler=Sampler(opts.sampling, served.tokenizer),
        text=TextStream(_decoder(served.tokenizer), stop),
        emit=channel.emit,
        logit_bias={**opts.logit_bias, **dict.fromkeys(served.tokenizer.eog_ids, -np.inf)}
        if opts.ignore_eos
        else opts.logit_bias,
        logprobs=opts.logprobs,
        top_logprobs=opts.top_logprobs,
    )
    served.scheduler.submit(job)  # may raise 503 when busy: before any byte of the response
    shaper = ResponseShaper(chat=chat, model=served.model_id, token_bytes=served.tokenizer.token_bytes)
    if opts.stream:
        return StreamingResponse(
            _stream(served.scheduler, job, channel, shaper, opts),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(request, served.scheduler, job, channel, shaper, opts)


async def _stream(
    scheduler: Scheduler, job: Job, channel: _Channel, shaper: ResponseShaper, opts: params.GenerationOptions
) -> AsyncIterator[bytes]:
    """SSE chunks; if the client goes away Starlette cancels this generator and `finally` frees the slot."""
    done = False
    try:
        if shaper.chat:
            yield sse(shaper.chunk(role=True))
        while True:
            event = await channel.queue.get()
            if isinstance(event, Delta):
                yield sse(shaper.chunk(event.text, logprobs=event.logprobs if opts.logprobs else None))
            elif isinstance(event, Finished):
                done = True
                yield sse(shaper.chunk(finish_reason=event.reason))
                if opts.include_usage:
                    yield sse(shaper.usage_chunk(event))
                yield sse("[DONE]")
                return
            elif isinstance(event, Failed):
                done = True
                yield sse(event.error.body())
                yield sse("[DONE]")
                return
    finally:
        if not done:
            scheduler.cancel(job)


async def _collect(
    request: Request,
    scheduler: Scheduler,
    job: Job,
    channel: _Channel,
    shaper: ResponseShaper,
    opts: params.GenerationOptions,
) -> Response:
    """Wait for the whole completion while watching for the client hanging up (then cancel the job)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scheduler.cancel(job)
        channel.queue.put_nowait(None)

    watcher = asyncio.create_task(watch())
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        while True:
            event = await channel.queue.get()
            if event is None:
                return Response(status_code=499)  # the client has gone: nobody will read this
            if isinstance(event, Delta):
                texts.append(event.text)
                logprobs.extend(event.logprobs)
            elif isinstance(event, Failed):
                raise event.error
            else:
                return JSONResponse(
                    shaper.response("".join(texts), event, logprobs if opts.logprobs else None)
                )
    finally:
        scheduler.cancel(job)  # a no-op once finished; frees the slot if this handler was cancelled
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _decoder(tokenizer: Any) -> StreamDecoder:
    # Generated text continues the prompt: keep a leading space; control tokens print nothing (llama-server).
    return StreamDecoder(tokenizer, special=False, strip_leading_space=False)


# ---------------------------------------------------------------- the app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    err = APIError(500, f"Internal server error: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(err.body(), status_code=500)


ROUTES = [
    Route("/", index, methods=["GET"]),
    Route("/index.html", index, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/v1/health", health, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/models", models, methods=["GET"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/chat/completions", chat_completions, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/props", props, methods=["GET"]),
]


def create_app(
    settings: ServerSettings,
    engine_factory: EngineFactory = default_engine_factory,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The ASGI app. The model starts loading (on a thread) when the app's lifespan starts."""
    state = ServerState(settings, engine_factory)

    def load() -> None:
        try:
            state.load()
        except BaseException as e:  # reported on /health and to the CLI, which exits
            log.exception("failed to load %s", settings.model)
            state.load_error = f"{type(e).__name__}: {e}"
            if on_load_failure is not None:
                on_load_failure(e)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=load, name="ternary-load", daemon=True).start()
        yield
        state.shutdown()

    middleware = [
        Middleware(MetricsMiddleware, record=state.metrics.on_request, routes=[r.path for r in ROUTES]),
        Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]),
    ]
    if settings.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=settings.api_key, public_paths=PUBLIC_PATHS))
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.server = state
    return app
