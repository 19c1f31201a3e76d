"""Chat messages to one prompt string, with the checkpoint's own Jinja chat template.

Where the template comes from, in transformers' order of preference:

1. ``chat_template.jinja`` in the checkpoint directory;
2. ``chat_template`` in ``tokenizer_config.json``: a string, or a list of ``{"name", "template"}``
   of which the one named ``default`` is used;
3. otherwise ``DEFAULT_CHAT_TEMPLATE``, ChatML::

       <|im_start|>system\\nYou are helpful.<|im_end|>\\n
       <|im_start|>user\\nHi!<|im_end|>\\n
       <|im_start|>assistant\\n

   the format of Qwen-style chat models and of the checkpoints expertmesh generates. A model trained
   on another format will see an unfamiliar prompt: give such a checkpoint its own template.

The template renders as transformers renders it: in jinja2's *sandboxed* environment (a template is
third-party code), with ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` that keeps non-ASCII text, ``raise_exception`` and ``strftime_now``; its variables are
``messages``, ``add_generation_prompt=True`` and every special token the tokenizer config names
(``bos_token``, ``eos_token``, ...).

Messages are checked before rendering: a role of ``system``, ``developer`` (rendered as ``system``,
which is what templates know), ``user`` or ``assistant``, and text content (a string, or OpenAI's
list of ``{"type": "text", "text": ...}`` parts, joined with newlines as vLLM does). Anything else,
and any error the template raises, is an ``InvalidMessagesError`` naming the message at fault.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from expertmesh.errors import CheckpointError, InvalidRequestError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ROLES = ("system", "developer", "user", "assistant")
_ROLE_ALIASES = {"developer": "system"}


class InvalidMessagesError(InvalidRequestError):
    """The chat messages cannot be rendered: bad role or content, or the template refused them."""


class ChatTemplate(BaseModel):
    """A chat template and the special tokens it may use; plain strings, so it pickles (Ray)."""

    model_config = ConfigDict(frozen=True)

    source: str = DEFAULT_CHAT_TEMPLATE
    special_tokens: dict[str, str] = Field(default_factory=dict)
    is_default: bool = True

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ChatTemplate:
        """The checkpoint's template, or ChatML when it has none. Bad files raise CheckpointError."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
        tokens = _special_tokens(config)
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.is_file():
            source, where = jinja_path.read_text(), str(jinja_path)
        else:
            source, where = (
                _template_from_config(config.get("chat_template")),
                f"{config_path}: chat_template",
            )
        if source is None:
            return cls(special_tokens=tokens)
        try:
            _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"{where}: not a valid Jinja template (line {exc.lineno}: {exc})") from exc
        return cls(source=source, special_tokens=tokens, is_default=False)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        checked = normalize_messages(messages)
        try:
            return _compile(self.source).render(
                messages=checked, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except Exception as exc:  # the template is third-party code: whatever it raises, the messages caused
            raise InvalidMessagesError(f"the chat template cannot render these messages: {exc}") from exc


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Check roles and content; return plain ``{"role", "content"[, "name"]}`` dicts."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidMessagesError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidMessagesError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidMessagesError(
                f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)} (tools are not supported)"
            )
        item = {"role": _ROLE_ALIASES.get(role, role), "content": _text(message.get("content"), i)}
        if isinstance(message.get("name"), str):
            item["name"] = message["name"]
        out.append(item)
    return out


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise InvalidMessagesError(
                    f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}; "
                    "images, audio and files are not supported"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    if content is None:
        raise InvalidMessagesError(f"messages[{i}] has no content: every message needs text content")
    raise InvalidMessagesError(f"messages[{i}].content must be a string or a list of text parts")


def _template_from_config(value: Any) -> str | None:
    if isinstance(value, list):  # transformers' multi-template form: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """``bos_token`` & co. from tokenizer_config.json, as strings or as AddedToken dicts."""
    tokens = {}
    for key, value in config.items():
        if not key.endswith("_token"):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
