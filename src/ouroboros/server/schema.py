"""The OpenAI request schema: what a completions or chat body may hold, checked before any work.

Everything here is pure (no model, no event loop, no queue), so each rule is written once and every
refusal is an `APIError` naming the field, in OpenAI's error format.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import OuroborosError
from ..generation import make_verifier

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
JSON_MEDIA_TYPE = "application/json"

UNSUPPORTED_OPTIONS = {
    "best_of": [None, 1], "echo": [None, False], "logprobs": [None, False], "top_logprobs": [None, 0],
    "suffix": [None, ""], "presence_penalty": [None, 0], "frequency_penalty": [None, 0],
    "logit_bias": [None, {}], "tools": [None, []], "functions": [None, []],
    "response_format": [None, {"type": "text"}],
}
"""OpenAI options this server does not implement, with the values that mean "off": anything else is
refused rather than silently ignored."""

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error(request_id: str) -> APIError:
    """The only thing a client learns about a bug: the id to quote, which the server's log pairs with
    the traceback."""
    return APIError(500, f"internal error (request id {request_id})", type="server_error")


def from_package_error(exc: OuroborosError) -> APIError:
    """A 400 for the package's own "your input is wrong" errors. Their messages start with the
    argument's name ("temperature 1e-45 is too small..."), which becomes `param` when it is a request field."""
    first = str(exc).split(" ", 1)[0]
    return bad(str(exc), first if first in ChatOptions.model_fields else None)


def check_content_type(header: str | None) -> None:
    """Only JSON bodies: a form or text/plain POST is a "simple request" that a web page may send to a
    local server without a CORS preflight, so accepting it would let any page start generations."""
    media_type = (header or "").split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        got = f"got {header!r}" if header else "got none"
        raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: {JSON_MEDIA_TYPE}' ({got})",
                       code="unsupported_media_type")


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class Options(BaseModel):
    """The scalar request fields, strictly typed ("5" is not an int, true is not a number)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    n: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatOptions(Options):
    max_completion_tokens: int | None = Field(None, ge=1)



def parse_options(cls: type[Options], body: Any) -> Options:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    try:
        options = cls.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise bad(f"{param}: {error['msg']}", param) from None
    if options.n not in (None, 1):
        raise bad("n must be 1: this server returns one choice per request", "n")
    for name, allowed in UNSUPPORTED_OPTIONS.items():
        if body.get(name) not in allowed:
            raise bad(f"{name} is not supported by this server (leave it out)", name)
    return options


def require(body: dict, name: str) -> Any:
    if name not in body:
        raise bad(f"{name}: Field required", name)
    return body[name]


def parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings of 1 to "
                  f"{MAX_STOP_CHARS} characters", "stop")
    return stops


def parse_prompt(prompt: Any) -> str | list[int]:
    """A string or a list of token ids, possibly wrapped in a one-element list (OpenAI's batch form)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("only one prompt per request is supported", "prompt")
    raise bad("prompt must be a string or a list of token ids", "prompt")


def check_token_ids(prompt: list[int], vocab_size: int) -> None:
    if any(not 0 <= t < vocab_size for t in prompt):
        raise bad(f"prompt token ids must be in [0, {vocab_size})", "prompt")


def parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(message, dict):
            raise bad(f"{param} must be an object with role and content", param)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad(f"{param}.role must be one of {', '.join(CHAT_ROLES)}", f"{param}.role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{param}.content: only text parts are supported", f"{param}.content")
            content = "\n".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise bad(f"{param}.content must be a string or a list of text parts", f"{param}.content")
        parsed.append({"role": CHAT_ROLES[role], "content": content})
    return parsed


def max_tokens_param(options: Options) -> tuple[int | None, str]:
    """The requested output length and the field that gave it (chat's newer max_completion_tokens wins)."""
    if isinstance(options, ChatOptions) and options.max_completion_tokens is not None:
        return options.max_completion_tokens, "max_completion_tokens"
    return options.max_tokens, "max_tokens"


def token_budget(options: Options, prompt_tokens: int, prompt_param: str, context: int | None,
                 default_max_tokens: int) -> int:
    """How many tokens to generate: the request's limit, checked against the context, or the default
    cut to what the context leaves."""
    max_tokens, max_param = max_tokens_param(options)
    if not prompt_tokens:
        raise bad("the prompt is empty", prompt_param)
    if context is not None:
        if prompt_tokens >= context:
            raise bad(f"the prompt has {prompt_tokens} tokens but the model's context is {context} tokens",
                      prompt_param, "context_length_exceeded")
        if max_tokens is not None and prompt_tokens + max_tokens > context:
            raise bad(f"the prompt ({prompt_tokens} tokens) + {max_param} ({max_tokens}) exceeds the model's "
                      f"context of {context} tokens", max_param, "context_length_exceeded")
    if max_tokens is not None:
        return max_tokens
    return default_max_tokens if context is None else min(default_max_tokens, context - prompt_tokens)


def sampling(options: Options) -> dict:
    """`generate`'s sampling arguments; {} for greedy. Temperature 0 (the default here, unlike OpenAI's
    1) or top_p 0 leave only the most likely token. Checked now by `generate`'s own rule, so that a
    temperature too small to sample from is a 400 before the request is queued, not a failed stream."""
    if not options.temperature or options.top_p == 0:
        return {}
    arguments = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p or 1.0}
    if options.seed is not None:
        arguments["seed"] = options.seed
    try:
        verifier(arguments)
    except OuroborosError as exc:
        raise from_package_error(exc) from None
    return arguments


def verifier(arguments: dict, generator=None):
    """The verification rule (greedy or a Sampler) for `sampling`'s arguments, `generate`'s defaults
    for the rest; a Sampler draws from `generator` when given (in place of the arguments' seed)."""
    return make_verifier(**{"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                            **arguments, "seed": None if generator is not None else arguments.get("seed"),
                            "generator": generator})
