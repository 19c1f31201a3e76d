"""OpenAI request, response and error shapes, and the mapping of a request to ``SamplingParams``.

Choices where OpenAI is silent or where we follow vLLM's OpenAI server:

- ``temperature`` defaults to 1.0 and ``top_p`` to 1.0, as in OpenAI and vLLM (which would take a
  default from the checkpoint's generation_config.json; ours carry none). Ranges are the engine's:
  ``temperature`` in [0, 100] with 0 meaning greedy, ``top_p`` in (0, 1]. As in vLLM, a temperature
  below ``GREEDY_BELOW_TEMPERATURE`` (1e-5) is greedy too: sampling at it all but always picks the
  argmax anyway, and below about 1e-37 the scaled logits overflow float32 and sampling would fail.
- ``max_tokens`` defaults to 16 for ``/v1/completions`` (OpenAI, vLLM). For chat it defaults to "until
  EOS or the context is full" (vLLM); ``max_completion_tokens`` wins over the older ``max_tokens``.
  A ``max_tokens`` that overruns the context is not an error: generation stops at the context end
  with ``finish_reason="length"``.
- Extensions, as vLLM names them: ``top_k`` (-1 or 0: off) and ``ignore_eos``.
- One choice per request: ``n`` other than 1, ``best_of`` other than 1, and batches of prompts
  (a list of several strings or token lists) are refused with a 400; a one-element batch is unwrapped.
- Fields we do not implement but OpenAI defines (``logprobs``, penalties, ``logit_bias``, ``echo``,
  ``suffix``, ``tools``, ``response_format``, ...) are refused with a 400 naming them unless they
  carry their neutral value (``NEUTRAL_VALUES``); fields nobody defines are ignored, as vLLM does.
  ``user`` is ignored.
- Types are strict, as the OpenAPI document states them: ``"16"`` is no integer, ``1`` no boolean
  (``16.0`` is an integer, as in JSON Schema). vLLM's pydantic models would coerce both.

Every limit above is a constraint of the request models, so the OpenAPI document states it and a
request that breaks it is a 400 naming the field before anything runs. The served model's own limits
(its name, vocabulary and context length) are checked by the engine: 404, or a 400 naming ``prompt``
or ``messages``.
- ``stream_options`` is only allowed with ``stream=true`` (vLLM). With ``include_usage`` the stream
  ends with one more chunk whose ``choices`` is empty and which carries ``usage``.
- ``finish_reason`` is the engine's: ``stop`` (EOS, a stop token or a stop string), ``length``, or
  ``abort``; vLLM's ``stop_reason`` (the stop string or token id that ended it) is included too.
"""

from __future__ import annotations

import functools
import json
import operator
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from expertmesh.api.chat_template import ROLES
from expertmesh.engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
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
#
# Every limit the server puts on a request that does not depend on the served model is a constraint
# of these models: pydantic checks it before anything runs, and the OpenAPI document states it. What
# depends on the model (its name, vocabulary and context length) only the engine can check; that
# answers 404 for the model, or a 400 naming `prompt` or `messages`.
#
# The models are strict: the document says `integer`, `number`, `string` and `boolean`, so "16" is
# no integer and 1 is no boolean here either. As in JSON Schema, an integer is a number and a
# number with no fractional part (16.0) is an integer.

_REQUEST_CONFIG = ConfigDict(strict=True, extra="allow")  # unknown fields are ignored, as vLLM does


def _integral_float_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _integer(**bounds: int) -> Any:
    """An integer as JSON Schema has it, within ``bounds`` (``ge=1``, ...); the bounds come before
    the validator, or pydantic would write them to the document as unknown keywords."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral_float_as_int)]


GREEDY_BELOW_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS

TokenCount = _integer(ge=1)
TopK = _integer(ge=-1)
# A non-negative int64, said so with `format` rather than `exclusiveMaximum: 2**63`: FastAPI writes
# the document's bounds as floats, and a float that large is read back imprecisely (schemathesis
# then generates 2**63 + 191 as valid); int64's bounds are exact by definition.
Seed = Annotated[
    _integer(ge=0, lt=2**63), WithJsonSchema({"type": "integer", "format": "int64", "minimum": 0})
]


def _must_equal(expected: Any, value: Any) -> Any:
    if value != expected:
        raise ValueError(f"must be {json.dumps(expected)}")
    return value


# The JSON type of each neutral value, and the Python type that takes it strictly: an integer's is
# float, so that 0.0 is 0 as in JSON (strict float takes ints, and no bools).
_JSON_TYPES: dict[type, tuple[str, type]] = {
    bool: ("boolean", bool),
    int: ("integer", float),
    str: ("string", str),
    list: ("array", list),
    dict: ("object", dict),
}


def _exactly(*allowed: Any) -> Any:
    """A type taking only ``allowed``, each as its own JSON type: ``Literal[1]`` would also take
    ``true``, and ``Literal[False]`` ``0``, which the document's ``const`` refuses. No values: ``null``.
    """
    branches: list[Any] = []
    for value in allowed:
        json_type, python_type = _JSON_TYPES[type(value)]
        branches.append(
            Annotated[
                python_type,
                Strict(),
                AfterValidator(functools.partial(_must_equal, value)),
                # with its type, or pydantic would merge `false` and `0` (equal in Python) into one
                WithJsonSchema({"type": json_type, "const": value}),
            ]
        )
    return functools.reduce(operator.or_, branches) if branches else type(None)


def _json_list(values: Iterable[Any]) -> str:
    shown = [json.dumps(v) for v in values]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


# Fields OpenAI defines that this server does not implement, with the values that ask for nothing
# besides null: clients often send those defaults, so they are taken (and ignored); any other value
# is a 400 naming the field, rather than silently doing less than asked.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),  # one choice per request
    "best_of": (1,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
}


def _neutral_field(name: str) -> tuple[Any, Any]:
    allowed = _json_list([None, *NEUTRAL_VALUES[name]])
    return _exactly(*NEUTRAL_VALUES[name]) | type(None), Field(
        None, description=f"only {allowed}: nothing else is supported"
    )


class _StrictRequest(BaseModel):
    model_config = _REQUEST_CONFIG


_NeutralOnly = create_model(  # type: ignore[call-overload]
    "_NeutralOnly", __base__=_StrictRequest, **{name: _neutral_field(name) for name in NEUTRAL_VALUES}
)


# The error types of the request models' own refusals, which the app reports as OpenAI's `code`.
REQUEST_ERROR_CODES = frozenset({"invalid_value", "unsupported_value"})


def _explained(value: Any, handler: ValidatorFunctionWrapHandler, message: str, code: str = "invalid_value"):
    """``handler(value)``, with pydantic's errors (one per union branch) replaced by one message."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(code, message) from None


class StreamOptions(_StrictRequest):
    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
_STOP_RULE = (
    f"must be a string or a list of at most {MAX_STOP_STRINGS} strings, "
    f"each of 1 to {MAX_STOP_STRING_CHARS} characters"
)
# vLLM's rule: stream_options only with stream=true; declared to the document as if/then.
_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}


class _GenerationRequest(_NeutralOnly):  # type: ignore[misc, valid-type]
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(json_schema_extra=_STREAM_OPTIONS_NEED_STREAM)

    model: str
    max_tokens: TokenCount | None = None
    temperature: float | None = Field(
        None, ge=0.0, le=100.0, description=f"0, or below {GREEDY_BELOW_TEMPERATURE}, is greedy"
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: TopK | None = Field(
        None, description="extension: sample from the k most likely tokens; -1 or 0: all"
    )
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"stop strings: {_STOP_RULE.removeprefix('must be ')}"
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="only with `stream: true`")
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS")

    @field_validator(*NEUTRAL_VALUES, mode="wrap")
    @classmethod
    def _only_neutral(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        allowed = _json_list([None, *NEUTRAL_VALUES[str(info.field_name)]])
        message = f"{json.dumps(value)} is not supported by this server: leave it out or send {allowed}"
        return _explained(value, handler, message, "unsupported_value")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, stop: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _explained(stop, handler, _STOP_RULE)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid_value", "only allowed with stream=true")
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _requested_max_tokens(self) -> tuple[str, int | None]:
        """(the field the client used, its value)."""
        return "max_tokens", self.max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters for this request; any bad value is a 400 naming its field."""
        max_tokens_field, max_tokens = self._requested_max_tokens()
        values = {
            "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": 0.0
            if self.temperature is not None and self.temperature < GREEDY_BELOW_TEMPERATURE
            else self.temperature,
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
            # The request's own constraints are SamplingParams' ones, so this is a second line of
            # defence. SamplingParams raises `from None`, which hides pydantic's error but keeps it
            # as __context__ (PEP 415): its locations name the fields, to report as `param`.
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


TokenId = Annotated[_integer(ge=0), Field(description="a token id; the model's vocabulary bounds it")]
TextPrompt = Annotated[str, Field(min_length=1)]
TokenPrompt = Annotated[list[TokenId], Field(min_length=1)]
_PROMPT_RULE = (
    "must be non-empty text, a non-empty list of token ids (integers >= 0), "
    "or a list holding exactly one of those"
)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: (
        TextPrompt
        | TokenPrompt
        | Annotated[list[TextPrompt], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenPrompt], Field(min_length=1, max_length=1)]
    ) = Field(
        description="one prompt: a batch of several is refused; its length in tokens must leave room "
        "in the model's context (`max_model_len` of `GET /v1/models`) for one new token"
    )

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt(cls, prompt: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list):
            raise PydanticCustomError(
                "unsupported_value",
                "batches of prompts are not supported: send one prompt per request (got {count})",
                {"count": len(prompt)},
            )
        return _explained(prompt, handler, _PROMPT_RULE)

    def single_prompt(self) -> str | list[int]:
        """The one prompt, text or token ids, unwrapped from a one-element batch."""
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str | list):
            return prompt[0]
        return prompt


class TextPart(_StrictRequest):
    """OpenAI's ``{"type": "text", "text": ...}`` content part: the only kind taken here."""

    type: Literal["text"]
    text: str


_CONTENT_RULE = (
    'must be a string or a non-empty list of text parts {"type": "text", "text": ...}; '
    "images, audio and files are not supported"
)


class ChatMessage(_StrictRequest):
    """One message. ``developer`` is rendered as ``system``, which is what chat templates know;
    tool messages and tool calls are not supported."""

    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_only(cls, content: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _explained(content, handler, _CONTENT_RULE)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(
        min_length=1,
        description="rendered with the model's chat template; the result must leave room in the "
        "model's context (`max_model_len` of `GET /v1/models`) for one new token",
    )
    max_completion_tokens: TokenCount | None = Field(None, description="wins over `max_tokens`")

    def _requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


# --- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """``cmpl-...`` / ``chatcmpl-...``: unique, and used as the engine's request id too."""
    return f"{prefix}-{uuid.uuid4().hex}"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens served from the prefix cache, not prefilled")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


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
