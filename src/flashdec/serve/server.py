"""The OpenAI-compatible HTTP server (``python -m flashdec serve``) over :class:`Engine`.

Endpoints: ``GET /health``, ``GET /v1/models`` (and ``/v1/models/{id}``),
``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or not, one choice per
request (``n`` 1).

Requests. Fields are checked by type (strictly: ``"5"`` is not a number, ``true`` is not an
int); fields this server does not know are ignored, since OpenAI clients send extras. Every
error answers in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
a bad request (including malformed JSON, which FastAPI would answer with 422), 404 for a model
other than the served one, 503 when the engine's queue is full, 500 if generation fails.
``model`` may be left out (it is the served one anyway). ``max_tokens`` defaults to 16 for
completions (OpenAI's default) and to the rest of the context for chat.

Streaming is Server-Sent Events written by hand into a ``StreamingResponse``: ``data: {json}``
blocks and a closing ``data: [DONE]``, exactly what OpenAI sends and its clients parse (no
``event:`` names, no pings). Chunks carry the text that arrived since the last one (deltas
that queued up while the client was slow go out together). A client that goes away stops
its request in the engine, freeing its slot: the stream's response cancels it whenever it
ends without the request having finished (disconnect, cancelled task, failed write); a
non-streamed request watches for the disconnect while it waits.

Threading. The engine calls each request's ``emit`` on its own thread; ``emit`` hands the
event to the event loop with ``loop.call_soon_threadsafe``. Prompts are tokenized on the event
loop's thread, so the tokenizer is only ever encoding on one thread.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Finished, QueueFullError, SamplingParams, TextDelta

__all__ = ["create_app", "run_server", "serve"]

MAX_STOP = 4
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
GRACEFUL_SHUTDOWN_S = 5  # then uvicorn cancels the streams still open


# -- errors --------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    text = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or None


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation error (422) as a 400: the first problem, named by its field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON{': ' + why if why else ''}")
    param = _param(loc)
    if param is None:  # the body itself: missing, or not an object
        return APIError(400, "the request body must be a JSON object (sent with "
                             "Content-Type: application/json)")
    message = str(first.get("msg", "invalid value"))
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {message}{more}", param=param,
                    code="missing_required_parameter" if kind == "missing" else "invalid_value")


# -- request bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = False


class _SamplingBody(_Body):
    """The fields both endpoints share. ``None`` (JSON null) means the default."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Any = Field(None, validate_default=True)  # -> tuple[str, ...]
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return tuple(stops)

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                              stop=self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True)  # -> str
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        """A string, or a list of text parts (joined by newlines)."""
        if value is None:
            raise ValueError("the message has no content")
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ValueError('only text content parts ({"type": "text", "text": "..."}) '
                                 'are supported')
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_SamplingBody):
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        """A string or a list of token ids, or a list holding one of them."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(
                isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            raise ValueError(f"one prompt per request is supported, got {len(value)}")
        raise ValueError("must be a string or a list of token ids")


# -- generation ----------------------------------------------------------------------------


class _Generation:
    """One engine request seen from the event loop: its events in a queue."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TextDelta | Finished] = asyncio.Queue()
        self.done = asyncio.Event()
        self.finished: Finished | None = None
        self.request = engine.submit(prompt, params, self._emit)  # may raise: nothing to undo

    def _emit(self, event: TextDelta | Finished) -> None:  # on the engine's thread
        self.loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: TextDelta | Finished) -> None:
        self.queue.put_nowait(event)
        if isinstance(event, Finished):
            self.done.set()

    def cancel(self) -> None:
        """Stop the request in the engine unless its Finished arrived already."""
        if self.finished is None:
            self.engine.cancel(self.request)

    def _take(self, first: TextDelta | Finished) -> tuple[str, Finished | None]:
        """``first`` and whatever else is queued: their text and the Finished if among them."""
        texts, event = [], first
        while True:
            if isinstance(event, Finished):
                self.finished = event
                return "".join(texts), event
            texts.append(event.text)
            if self.queue.empty():
                return "".join(texts), None
            event = self.queue.get_nowait()

    async def chunks(self) -> AsyncIterator[tuple[str, Finished | None]]:
        """The text as it arrives, the last item carrying the Finished event."""
        while self.finished is None:
            yield self._take(await self.queue.get())

    async def result(self, request: Request) -> tuple[str, Finished]:
        """All the text and the Finished event; cancels the request if the client goes away.
        Raises the APIError of a request that ended without "stop" or "length"."""
        watcher = asyncio.ensure_future(_disconnected(request))
        waiter = asyncio.ensure_future(self.done.wait())
        try:
            await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task is cancelled (shutdown)
            watcher.cancel()
            waiter.cancel()
            if not self.done.is_set():
                self.cancel()
        if not self.done.is_set():  # the client left; nobody reads this answer
            raise APIError(499, "the client disconnected", type="client_closed")
        text, finished = self._take(self.queue.get_nowait())
        assert finished is not None  # the Finished event is queued after every delta
        error = _failure(finished)
        if error is not None:
            raise error
        return text, finished


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EngineStream(StreamingResponse):
    """A streamed response that cancels its engine request however the response ends
    unfinished: client disconnect (the task is cancelled), a failed write, shutdown."""

    def __init__(self, content: AsyncIterator[str], generation: _Generation) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                               separators=(",", ":"))
    return f"data: {data}\n\n"


def _usage(finished: Finished) -> dict[str, int]:
    return {"prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def _failure(finished: Finished) -> APIError | None:
    """The error a request that ended without "stop" or "length" answers with."""
    if finished.reason in ("stop", "length"):
        return None
    if finished.reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down",
                        type="server_error", code="cancelled")
    return APIError(500, f"generation failed: {finished.message or 'unknown error'}",
                    type="server_error", code="generation_error")


# -- the app -------------------------------------------------------------------------------


def _token_ids(encoded: Any) -> list[int]:
    """Token ids from what a tokenizer call returns: a BatchEncoding or dict (transformers 5's
    ``apply_chat_template(tokenize=True)``), a list, or a list holding one list."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    ids = list(encoded)
    if ids and isinstance(ids[0], (list, tuple)):
        if len(ids) != 1:
            raise ValueError(f"expected the ids of one sequence, got {len(ids)} sequences")
        ids = list(ids[0])
    return [int(t) for t in ids]


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app serving ``engine`` (started by the caller, which also closes it) under
    the model id ``model_name``."""
    from .. import __version__

    app = FastAPI(title="flashdec", version=__version__,
                  description="OpenAI-compatible completions over flashdec's decode engine")
    app.state.engine = engine
    app.state.model_name = model_name
    created = int(time.time())
    tokenizer = engine.tokenizer
    vocab_size = getattr(getattr(engine.model, "config", None), "vocab_size", None) \
        or len(tokenizer)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                        type="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "flashdec"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{model_name!r}", param="model", code="model_not_found")

    def submit(prompt: list[int], body: _SamplingBody, max_tokens: int | None,
               param: str) -> _Generation:
        if max_tokens is None:  # the rest of the context (the engine stops when it is full)
            max_tokens = max(1, engine.max_seq_len - len(prompt))
        try:
            return _Generation(engine, prompt, body.sampling(max_tokens))
        except QueueFullError as exc:
            raise APIError(503, str(exc), type="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as exc:  # the engine's word on the prompt or the sampling fields
            too_long = len(prompt) >= engine.max_seq_len
            raise APIError(400, str(exc), param=param,
                           code="context_length_exceeded" if too_long else "invalid_value"
                           ) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Any:
        check_model(body.model)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        for message in messages:  # templates know "system"; "developer" is OpenAI's new name
            if message["role"] == "developer":
                message["role"] = "system"
        try:
            prompt = _token_ids(tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True))
        except Exception as exc:  # no template, or the template refuses these messages
            raise APIError(400, f"the chat template cannot format these messages: {exc}",
                           param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        generation = submit(prompt, body, max_tokens, "messages")
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk", "created": now,
                "model": model_name}

        if body.stream:
            def choice(text: str | None, reason: str | None) -> dict[str, Any]:
                return {"index": 0, "delta": {} if text is None else {"content": text},
                        "logprobs": None, "finish_reason": reason}

            opening = {"index": 0, "delta": {"role": "assistant", "content": ""},
                       "logprobs": None, "finish_reason": None}
            return _stream(generation, head, body, choice, opening)

        text, finished = await generation.result(request)
        return {"id": ident, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finished.reason}],
                "usage": _usage(finished)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = _token_ids(tokenizer(prompt))
        elif any(not 0 <= t < vocab_size for t in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab_size})", param="prompt")
        generation = submit(prompt, body, 16 if body.max_tokens is None else body.max_tokens,
                            "prompt")
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": now, "model": model_name}

        if body.stream:
            def choice(text: str | None, reason: str | None) -> dict[str, Any]:
                return {"index": 0, "text": text or "", "logprobs": None,
                        "finish_reason": reason}

            return _stream(generation, head, body, choice)

        text, finished = await generation.result(request)
        return {"id": ident, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finished.reason}],
                "usage": _usage(finished)}

    return app


def _stream(generation: _Generation, head: dict[str, Any], body: _SamplingBody,
            choice: Callable[[str | None, str | None], dict[str, Any]],
            opening: dict[str, Any] | None = None) -> _EngineStream:
    """A streamed answer: ``opening`` (a choice) if given, a chunk per piece of text as it
    arrives (``choice(text, None)``), then the finale (``choice(None, reason)``)."""
    usage_field = {"usage": None} if body.include_usage else {}

    def chunk(one: dict[str, Any]) -> str:
        return _sse({**head, "choices": [one], **usage_field})

    async def events() -> AsyncIterator[str]:
        if opening is not None:
            yield chunk(opening)
        async for text, finished in generation.chunks():
            if text:
                yield chunk(choice(text, None))
            if finished is not None:
                yield _finale(finished, chunk(choice(None, finished.reason)), head, body)

    return _EngineStream(events(), generation)


def _finale(finished: Finished, last_chunk: str, head: dict[str, Any],
            body: _SamplingBody) -> str:
    """The end of a stream: the chunk with finish_reason (or an error event, which OpenAI's
    clients raise), the usage chunk if asked for, ``[DONE]``."""
    error = _failure(finished)
    out = _sse(error.body()) if error is not None else last_chunk
    if body.include_usage:
        out += _sse({**head, "choices": [], "usage": _usage(finished)})
    return out + _sse("[DONE]")


# -- running it ----------------------------------------------------------------------------


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", banner: str = "") -> None:
    """Start ``engine``, serve it with uvicorn until interrupted (Ctrl-C), close the engine.
    Prints the URL (and ``banner``) once the socket listens."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
                print(f"flashdec: serving {model_name!r} at {_url(host, bound[1])}/v1"
                      f"{banner}", flush=True)

    # no startup/shutdown hooks: with the lifespan protocol on, the Ctrl-C uvicorn raises again
    # after stopping lands in its pending lifespan task and logs a traceback
    config = uvicorn.Config(create_app(engine, model_name), host=host, port=port,
                            log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    engine.start()
    try:
        Server(config).run()
    finally:
        engine.close()


def serve(args: Any) -> int:
    """``python -m flashdec serve``: load the model, build the engine, run the server."""
    import torch

    from .models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"flashdec: loading {args.model or 'the default model'} on {device}", flush=True)
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, attn=args.attn, max_batch=args.max_batch,
                    max_queue=args.max_queue, max_seq_len=args.max_seq_len)
    banner = (f" (attention {args.attn}, {device}, max batch {args.max_batch}, max queue "
              f"{args.max_queue}, max seq len {engine.max_seq_len})")
    try:
        run_server(engine, loaded.name, host=args.host, port=args.port, banner=banner)
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it handled again once it stopped
        pass
    print("flashdec: stopped", flush=True)
    return 0
