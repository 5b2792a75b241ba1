"""Jinja chat templates rendered the way Hugging Face transformers renders them.

Templates from a checkpoint are untrusted code, so they run in jinja's immutable sandbox with the same
environment transformers builds (trim_blocks, lstrip_blocks, loop controls, a tojson that does not escape
HTML, raise_exception, strftime_now, a restricted dict and namespace); the same template then gives the
same prompt in herd as in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from herd.frontend.chat.base import ChatTemplate, Piece, continue_final_message

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class JinjaChatTemplate(ChatTemplate):
    """A jinja template, or several named ones (tokenizer_config.json may hold a list of templates)."""

    def __init__(self, source: str | Mapping[str, str], name: str = "jinja") -> None:
        self.sources = {"default": source} if isinstance(source, str) else dict(source)
        self.name = name

    def select(self, tools: Sequence[dict[str, Any]] | None) -> str:
        # transformers' choice among named templates: "tool_use" when tools are given, else "default".
        if tools is not None and "tool_use" in self.sources:
            return self.sources["tool_use"]
        if "default" in self.sources:
            return self.sources["default"]
        raise ValueError(f"chat template has no 'default' among {sorted(self.sources)}")

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[Piece]:
        continue_final = continue_final_message(kwargs, add_generation_prompt)
        kwargs.pop("continue_final_message", None)
        # Like transformers: drop None-valued keys (OpenAI clients send content=None, tool_calls=None),
        # and hand the template plain data only.
        chat = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
        if continue_final:
            final_text = _tag_final_message(chat)
        template = _compile(self.select(tools))
        text = template.render(
            messages=chat,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(kwargs.pop("documents", None)),
            add_generation_prompt=add_generation_prompt,
            **{k: _plain(v) for k, v in kwargs.items()},
        )
        if continue_final:
            text = _cut_at_tag(text, final_text)
        return [Piece(text, trusted=True)]


def _tag_final_message(chat: list[dict[str, Any]]) -> str:
    if not chat:
        raise ValueError("continue_final_message needs a message to continue")
    content = chat[-1].get("content")
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_TAG
        return content
    for part in reversed(content or []):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            text = part["text"]
            part["text"] = text + _CONTINUE_TAG
            return text
    raise ValueError("continue_final_message: the final message has no text to continue")


def _cut_at_tag(text: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in text or final_text.strip() not in text:
        raise ValueError("continue_final_message: the template dropped the final message")
    at = text.rindex(tag)
    # A template that trims content also trimmed the space of our tag; cut the same way transformers does.
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _plain(value: Any) -> Any:
    # Rebuild inputs from JSON types so the sandboxed template never sees objects with unsafe methods.
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, ...) can carry extra methods: strip them back to the base type.
    if isinstance(value, str):
        return str.__str__(value)
    for base in (bool, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; chat templates need the JSON as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself to the template.
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    # Underscore attributes could reach CPython internals; transformers refuses them too.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key: str, value: Any) -> None:
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key: Any) -> None:
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")


class _GenerationTag(jinja2.ext.Extension):
    # transformers' `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    # for inference it only has to parse and render its body.
    tags = {"generation"}  # noqa: RUF012 (jinja's Extension API declares tags as a class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)
