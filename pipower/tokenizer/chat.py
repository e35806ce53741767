"""Render a model's Jinja chat template the way HF transformers does.

Same environment as transformers' `apply_chat_template`: sandboxed, trim_blocks + lstrip_blocks,
loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, and the
`{% generation %}` block (transformers uses it to mark assistant text; here it just renders).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

from ..errors import TokenizerError


def _raise_exception(message):
    raise TokenizerError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from e


def render_chat_template(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **extra) -> str:
    """The prompt for `messages`; `extra` variables (tools=..., etc.) are passed to the template."""
    import jinja2

    if not template:
        raise TokenizerError("this model has no chat template; pass a raw prompt instead")
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TokenizerError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **extra)
    except (jinja2.TemplateError, TypeError) as e:   # TypeError: e.g. 'str' + None content
        raise TokenizerError(f"chat template failed to render: {e}") from e
