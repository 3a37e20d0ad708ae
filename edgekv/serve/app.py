"""The HTTP side of ``edgekv serve``: an OpenAI-compatible API over one ``EngineLoop``.

``create_app(llm)`` serves an LLM of this process from a thread (loop.py); ``edgekv
serve`` gives ``app_for`` the engine in a process of its own (process.py). Routes:
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(each plain JSON or, with ``"stream": true``, server-sent events ending in ``[DONE]``),
``GET /health``, ``GET /metrics``. Handlers parse and check a request, tokenize it, submit
a ``Job`` and turn its events into the API's shapes; they never touch the engine.

Every client mistake is a 4xx with the API's error body (protocol.APIError): malformed
JSON, a bad field, an unknown model (404), a missing or wrong API key (401), a prompt that
does not fit (400, ``context_length_exceeded``), too many requests at once (429 with
Retry-After). A client that disconnects (mid-stream or while waiting) cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgekv.chat import render_chat

from . import metrics
from .loop import Busy, EngineLoop, Event, Job, Stopped
from .protocol import APIError, ChatRequest, CompletionRequest, parse

COMPLETION_MAX_TOKENS = 16  # the API's default for /v1/completions


class Server:
    """The app's state: the model's name, the key, the engine (``loop``: an EngineLoop or
    an EngineProcess, with the model's tokenizer and context length)."""

    def __init__(self, engine, served_model_name: str, api_key: str | None):
        self.loop, self.name, self.api_key = engine, served_model_name, api_key
        self.tokenizer, self.max_position = engine.tokenizer, engine.max_position
        self.registry = metrics.registry_for(self.loop.stats)
        self.created = int(time.time())

    # ---- checks ------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(),
                                                                    self.api_key):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves "
                           f"`{self.name}`", param="model", code="model_not_found")

    def submit(self, ids: list[int], params) -> Job:
        """Queue a request (the engine checks its tokens: ``_first`` reports a refusal)."""
        job = Job(ids, params)
        try:
            self.loop.submit(job)
        except Busy as e:
            raise APIError(429, str(e), type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except Stopped as e:
            raise _unavailable(e) from None
        return job

    def refused(self, e: Exception, n_prompt: int, param: str) -> APIError:
        """The engine's ValueError for a request it cannot queue, as a 400."""
        code = "context_length_exceeded" if n_prompt >= self.max_position else None
        return APIError(400, str(e), param=param, code=code)


def _unavailable(e: Exception) -> APIError:
    return APIError(503, str(e), type="server_error", code="engine_stopped")


def _failed(e: Exception) -> APIError:
    """An engine failure (not the client's doing) as the API's error."""
    if isinstance(e, Stopped):
        return _unavailable(e)
    return APIError(500, f"the engine failed: {e}", type="server_error")


async def _body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


async def _watch(srv: Server, request: Request, job: Job) -> None:
    """Once the client has gone away (its body is already read): cancel the job, and wake
    its reader with a ``gone`` event."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            srv.loop.cancel(job)
            job.gone()
            return


async def _events(srv: Server, request: Request, job: Job) -> AsyncIterator[Event]:
    """The job's events until it is done; a client that disconnects cancels the job (the
    engine aborts it before its next step)."""
    watcher = asyncio.ensure_future(_watch(srv, request, job))
    try:
        while True:
            event = await job.next()
            if event.gone:
                return
            yield event
            if event.done or event.error is not None:
                return
    finally:
        watcher.cancel()
        if not job.finished:
            srv.loop.cancel(job)


def _usage(u: dict) -> dict:
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _first(srv: Server, request: Request, job: Job, n_prompt: int, param: str
                 ) -> tuple[Event | None, AsyncIterator[Event]]:
    """The job's first event (an engine refusal raises APIError here, before a stream
    starts), and the iterator of the rest."""
    it = _events(srv, request, job)
    first = await anext(it, None)
    if first is not None and first.error is not None:
        await it.aclose()
        if isinstance(first.error, ValueError):
            raise srv.refused(first.error, n_prompt, param)
        raise _failed(first.error)
    return first, it


# ---- routes ------------------------------------------------------------------------------
async def models(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.authorize(request)
    return JSONResponse({"object": "list", "data": [
        {"id": srv.name, "object": "model", "created": srv.created, "owned_by": "edgekv"}]})


async def health(request: Request) -> Response:
    srv: Server = request.app.state.server
    alive = srv.loop.alive()
    return JSONResponse({"status": "ok" if alive else "engine stopped"},
                        status_code=200 if alive else 503)


async def metrics_route(request: Request) -> Response:
    srv: Server = request.app.state.server
    return Response(metrics.render(srv.registry), media_type=metrics.CONTENT_TYPE)


async def completions(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.authorize(request)
    req = parse(CompletionRequest, await _body(request))
    srv.check_model(req.model)
    prompt = req.prompt_one()
    if isinstance(prompt, str):
        if srv.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
        ids = srv.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    job = srv.submit(ids, req.sampling(COMPLETION_MAX_TOKENS))
    first, rest = await _first(srv, request, job, len(ids), "prompt")
    rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": srv.name}

    offsets = [0] * req.n  # each choice's text offset of its next token (logprobs)

    def logprobs(i: int, entries) -> dict | None:
        if entries is None:
            return None
        out = _completion_logprobs(entries, offsets[i])
        offsets[i] += sum(len(e[0]) for e in entries)
        return out

    def choice(c) -> dict:
        return {"index": c.index, "text": c.text, "logprobs": logprobs(c.index, c.logprobs),
                "finish_reason": c.finish_reason}

    if req.stream:
        return _stream(_chain(first, rest), head, lambda c: [choice(c)], req.include_usage)
    texts, reasons, usage, lps = await _collect(first, rest, req.n)
    return JSONResponse({**head, "choices": [
        {"index": i, "text": texts[i], "logprobs": logprobs(i, lps[i]),
         "finish_reason": reasons[i]} for i in range(req.n)], "usage": _usage(usage)})


async def chat_completions(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.authorize(request)
    req = parse(ChatRequest, await _body(request))
    srv.check_model(req.model)
    tok = srv.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer: chat needs one", param="messages")
    try:
        text = render_chat(tok, [m.as_dict() for m in req.messages])
    except Exception as e:  # noqa: BLE001 - a template's own error (role order, ...)
        raise APIError(400, f"the chat template refused the messages: {e}",
                       param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    room = srv.max_position - len(ids)
    job = srv.submit(ids, req.sampling(max(room, 1)))
    first, rest = await _first(srv, request, job, len(ids), "messages")
    rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": srv.name}
    if req.stream:
        def delta(i: int, d: dict, reason: str | None = None) -> dict:
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": reason}

        def chunks(c) -> list[dict]:
            out = [delta(c.index, {"content": c.text})] if c.text or c.logprobs else []
            if c.logprobs:
                out[0]["logprobs"] = _chat_logprobs(c.logprobs)
            if c.finish_reason is not None:
                out.append(delta(c.index, {}, c.finish_reason))
            return out

        opening = [delta(i, {"role": "assistant", "content": ""}) for i in range(req.n)]
        return _stream(_chain(first, rest), head, chunks, req.include_usage, opening)
    texts, reasons, usage, lps = await _collect(first, rest, req.n)
    return JSONResponse({**head, "object": "chat.completion", "choices": [
        {"index": i, "message": {"role": "assistant", "content": texts[i]},
         "logprobs": None if lps[i] is None else _chat_logprobs(lps[i]),
         "finish_reason": reasons[i]} for i in range(req.n)], "usage": _usage(usage)})


def _completion_logprobs(entries, offset: int) -> dict:
    """The completions API's log-probs of ``entries`` ((text, log-prob, alternatives) per
    token), the first token at ``offset`` in the choice's text."""
    offs = []
    for text, _, _ in entries:
        offs.append(offset)
        offset += len(text)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [dict(e[2]) for e in entries], "text_offset": offs}


def _chat_logprobs(entries) -> dict:
    """The chat API's log-probs of ``entries``."""
    def item(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alts]}
                        for t, lp, alts in entries]}


def _stream(events: AsyncIterator[Event], head: dict, chunks, include_usage: bool,
            opening: list[dict] = ()) -> StreamingResponse:
    """Server-sent events: one chunk per choice dict (``opening`` first, then ``chunks(c)``
    of each choice delta), the usage chunk if asked for, ``[DONE]``."""
    async def body() -> AsyncIterator[str]:
        for c in opening:
            yield _sse({**head, "choices": [c]})
        async for ev in events:
            for choice in ev.choices:
                for c in chunks(choice):
                    yield _sse({**head, "choices": [c]})
            if ev.done and include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(ev.usage)})
            if ev.error is not None:  # mid-stream: the API's error object, then the end
                yield _sse(_failed(ev.error).body())
            if ev.done or ev.error is not None:
                yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


async def _chain(first: Event | None, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    if first is not None:
        yield first
    async for ev in rest:
        yield ev


async def _collect(first: Event | None, rest: AsyncIterator[Event], n: int
                   ) -> tuple[list[str], list[str | None], dict, list[list | None]]:
    """The whole text, finish reason and log-prob entries (None: not asked for) of each
    choice, and the usage."""
    texts, reasons, usage = [""] * n, [None] * n, None
    lps: list[list | None] = [None] * n
    async for ev in _chain(first, rest):
        if ev.error is not None:
            raise _failed(ev.error)
        for c in ev.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
            if c.logprobs:
                lps[c.index] = (lps[c.index] or []) + c.logprobs
        if ev.done:
            usage = ev.usage
    if usage is None:  # the client went away: nobody reads this
        raise APIError(499, "client closed the request")
    return texts, reasons, usage, lps


# ---- errors ------------------------------------------------------------------------------
async def _api_error(request: Request, e: APIError) -> Response:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _http_error(request: Request, e: HTTPException) -> Response:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(APIError(e.status_code, str(e.detail), code=kind).body(),
                        status_code=e.status_code)


async def _server_error(request: Request, e: Exception) -> Response:
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}",
                                 type="server_error").body(), status_code=500)


def create_app(llm, served_model_name: str, api_key: str | None = None,
               max_live: int = 128) -> Starlette:
    """The ASGI app over ``llm`` (of this process); its engine thread starts and stops
    with the app."""
    return app_for(EngineLoop(llm, max_live), served_model_name, api_key)


def app_for(engine, served_model_name: str, api_key: str | None = None) -> Starlette:
    """The ASGI app over ``engine`` (an EngineLoop or an EngineProcess), started and
    stopped with the app."""
    srv = Server(engine, served_model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.loop.start()
        try:
            yield
        finally:
            srv.loop.stop()

    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ], exception_handlers={APIError: _api_error, HTTPException: _http_error,
                           Exception: _server_error}, lifespan=lifespan)
    app.state.server = srv
    return app
