"""OpenAI request, response and error shapes, and the mapping of a request to ``SamplingParams``.

Choices where OpenAI is silent or where we follow vLLM's OpenAI server:

- ``temperature`` defaults to 1.0 and ``top_p`` to 1.0, as in OpenAI and vLLM (which would take a
  default from the checkpoint's generation_config.json; ours carry none). Ranges are the engine's:
  ``temperature`` in [0, 100] with 0 meaning greedy, ``top_p`` in (0, 1].
- ``max_tokens`` defaults to 16 for ``/v1/completions`` (OpenAI, vLLM). For chat it defaults to "until
  EOS or the context is full" (vLLM); ``max_completion_tokens`` wins over the older ``max_tokens``.
  A ``max_tokens`` that overruns the context is not an error: generation stops at the context end
  with ``finish_reason="length"``.
- Extensions, as vLLM names them: ``top_k`` (-1 or 0: off) and ``ignore_eos``.
- One choice per request: ``n`` other than 1, ``best_of`` other than 1, and batches of prompts
  (a list of several strings or token lists) are refused with a 400; a one-element batch is unwrapped.
- Fields we do not implement but OpenAI defines (``logprobs``, penalties, ``logit_bias``, ``echo``,
  ``suffix``, ``tools``, ``response_format``, ...) are refused with a 400 naming them unless they
  carry their neutral value; fields nobody defines are ignored, as vLLM does. ``user`` is ignored.
- ``stream_options`` is only allowed with ``stream=true`` (vLLM). With ``include_usage`` the stream
  ends with one more chunk whose ``choices`` is empty and which carries ``usage``.
- ``finish_reason`` is the engine's: ``stop`` (EOS, a stop token or a stop string), ``length``, or
  ``abort``; vLLM's ``stop_reason`` (the stop string or token id that ended it) is included too.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.errors import InvalidRequestError

# --- errors ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class OpenAIError(Exception):
    """An error that reaches the client as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def bad_request(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# --- requests ----------------------------------------------------------------------------------

# Fields OpenAI defines that we do not implement, with the values that ask for nothing.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="allow")  # unknown fields are kept aside to be checked, then ignored

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="extension: sample from the k most likely tokens")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _requested_max_tokens(self) -> tuple[str, int | None]:
        """(the field the client used, its value)."""
        return "max_tokens", self.max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters for this request; any bad value is a 400 naming its field."""
        if self.n not in (None, 1):
            raise bad_request(
                f"n={self.n}: only one choice per request is supported (n=1)", "n", "unsupported_value"
            )
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        for name, value in (self.model_extra or {}).items():
            if name in _NEUTRAL and value not in _NEUTRAL[name]:
                raise bad_request(
                    f"{name}={value!r} is not supported by this server", name, "unsupported_value"
                )
        max_tokens_field, max_tokens = self._requested_max_tokens()
        values = {
            "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "ignore_eos": self.ignore_eos,
        }
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return SamplingParams(**values)
        except InvalidRequestError as exc:
            # SamplingParams raises `from None`, which hides pydantic's error but keeps it as
            # __context__ (PEP 415): its locations name the fields, to report as `param`.
            if isinstance(exc.__context__, ValidationError):
                raise _field_error(exc.__context__, {"max_tokens": max_tokens_field}) from None
            raise bad_request(str(exc), None, "invalid_value") from None


def _field_error(exc: ValidationError, rename: dict[str, str]) -> OpenAIError:
    """One clause per bad value, each naming the request field; ``param`` is the first of them."""
    clauses, param = [], None
    for err in exc.errors():
        field = rename.get(str(err["loc"][0]), str(err["loc"][0])) if err["loc"] else "request"
        param = param or field
        msg = err["msg"].removeprefix("Value error, ")
        clauses.append(f"invalid {field!r}: {msg} (got {err['input']!r})")
    return bad_request("; ".join(clauses), param, "invalid_value")


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def single_prompt(self) -> str | list[int]:
        """The one prompt: text or token ids. Batches are refused."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise bad_request(
                    f"batches of prompts are not supported: send one prompt per request (got {len(prompt)})",
                    "prompt",
                    "unsupported_value",
                )
            prompt = prompt[0]
        return prompt


class ChatMessage(BaseModel):
    """One message as the client sent it; ``chat_template`` checks its role and content."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

    def _requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


# --- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """``cmpl-...`` / ``chatcmpl-...``: unique, and used as the engine's request id too."""
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "abort"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """The whole completion, and also each chunk of a stream (with ``usage`` null until the end)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int  # vLLM's extension: the context length


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- server-sent events --------------------------------------------------------------------------

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
