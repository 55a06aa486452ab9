"""Chat templates (Hugging Face's jinja2 format) rendered in a sandboxed environment, for
every tokenizer of `rl_reason.infra.tokenizer`."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    source: str = "<memory>",
    **kwargs: Any,
) -> str:
    """A Jinja chat template rendered as transformers' ``apply_chat_template(tokenize=False)``.

    Same sandboxed environment (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
    `strftime_now`, a `tojson` that keeps non-ASCII), with ``messages``,
    ``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``, ...) and
    `kwargs` (e.g. ``enable_thinking=False``) in scope; message keys whose value is None are
    dropped. The text may already contain the bos token: encode it with ``add_bos=False``.
    """
    if template is None:
        raise ValueError(
            f"{source} has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); use a plain prompt template instead"
        )
    if not messages:
        raise ValueError("apply_chat_template needs at least one message")
    chat = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        chat.append({k: v for k, v in m.items() if v is not None})
    return _compile_template(template).render(
        messages=chat,
        add_generation_prompt=add_generation_prompt,
        **{"tools": None, "documents": None, **dict(special_tokens or {}), **kwargs},
    )


@functools.cache
def _compile_template(template: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1'") from None

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
