"""Chat messages to prompt text through the model's own Jinja template, rendered in a sandbox.

The template comes from the GGUF's `tokenizer.chat_template` (the Hugging Face convention: variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, function `raise_exception`). It is untrusted
text from a model file, so it runs in Jinja's immutable sandbox. A model without a template gets ChatML, whose
end marker `<|im_end|>` is also returned as a stop string (a model that never saw ChatML may not have it as a
token)."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from ternary.server.errors import APIError

log = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_STOP = ("<|im_end|>",)


class TemplateRaised(Exception):
    """`raise_exception(...)` called by a template: the messages break the template's own rules."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    # Hugging Face's variant: no HTML escaping (Jinja's built-in tojson escapes <, > and &).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token strings it is rendered with."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.source = source
        self.is_fallback = not source
        env = _environment()
        template = None
        if source:
            try:
                template = env.from_string(source)
            except jinja2.TemplateError as e:
                log.warning("the model's chat template does not compile (%s); using ChatML instead", e)
                self.is_fallback = True
        self._template = template or env.from_string(FALLBACK_TEMPLATE)
        self.stop_strings: tuple[str, ...] = FALLBACK_STOP if self.is_fallback else ()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; a template that rejects them is the client's 400."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except TemplateRaised as e:
            raise APIError(400, f"The chat template rejected the messages: {e}", param="messages") from e
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise APIError(
                400, f"The chat template failed on these messages: {type(e).__name__}: {e}", param="messages"
            ) from e
