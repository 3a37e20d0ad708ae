"""The OpenAI API's request bodies, checked, and its error shape.

A request body is parsed into a pydantic model (unknown fields are ignored, as OpenAI's
own server does for fields it does not know); a missing or ill-typed field, an
out-of-range value, or a parameter EdgeKV does not implement becomes an ``APIError``
whose ``body()`` is the API's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekv.engine.sampling import SamplingParams

MAX_N = 16  # choices per request


class APIError(Exception):
    """An error the client caused (4xx) or the server's state (429, 503)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # an extension (0: off), as vLLM and llama.cpp
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension, for benchmarks
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters; APIError for values it does not take."""
        return self._sampling(default_max_tokens, None)

    def _sampling(self, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (leave it 0)", param=name)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens,
                              temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=tuple(stop), n=self.n,
                              ignore_eos=self.ignore_eos, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return self._sampling(default_max_tokens, self.logprobs)

    def check(self) -> None:
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1, self.n):
            raise APIError(400, "best_of is not supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")

    def prompt_one(self) -> str | list[int]:
        """The single prompt; a list of several is refused."""
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise APIError(400, "send one prompt per request (a list of several is not "
                               "supported)", param="prompt")
            p = p[0]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        c = self.content
        text = "".join(p.text for p in c) if isinstance(c, list) else (c or "")
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return self._sampling(default_max_tokens,
                              (self.top_logprobs or 0) if self.logprobs else None)

    def check(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens


def parse(model: type[BaseModel], body: object) -> BaseModel:
    """``body`` (decoded JSON) as ``model``; APIError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
        param = loc[0] if loc else None
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise APIError(400, f"{where}: {err.get('msg', 'invalid value')}" if where
                       else err.get("msg", "invalid request"), param=param,
                       code="missing_required_parameter" if err.get("type") == "missing"
                       else None) from None
    check = getattr(req, "check", None)
    if check is not None:
        check()
    return req
