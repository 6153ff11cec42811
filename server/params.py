"""Request bodies in, validated values out: every wrong type or value becomes a 400 naming the parameter.

Names follow the OpenAI API (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `logprobs`, ...), llama-
server's extensions (`top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`, the DRY sampler's `dry_multiplier`,
`dry_base`, `dry_allowed_length`, `dry_penalty_last_n`, `dry_sequence_breakers`) and Ollama's
`options{num_ctx, num_predict, ...}` (Ollama has no DRY options), so clients written for any of the three work
unchanged. A top-level field wins over the same one in `options`. Unknown fields are ignored (clients send
many); known fields this server cannot honour with a non-default value (n > 1, echo, tools, penalties other
than repeat_penalty and DRY) are refused rather than silently dropped."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ternary.engine.sampling import DryParams, SamplingParams
from ternary.server.errors import APIError, invalid_type, invalid_value

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_DRY_BREAKERS = 16  # each distinct list costs a scan of the vocabulary
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Ollama `options` names that map onto a top-level field of the same meaning.
OLLAMA_ALIASES = {
    "num_predict": "max_tokens",
    "num_ctx": "num_ctx",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "seed": "seed",
    "stop": "stop",
}
OLLAMA_IGNORED = frozenset({"num_thread", "num_batch", "num_gpu", "num_keep", "use_mmap", "numa"})


@dataclass(frozen=True)
class GenerationOptions:
    """Everything about one generation request except its prompt."""

    max_tokens: int | None  # None: until the context is full or an end-of-generation token
    sampling: SamplingParams
    logit_bias: dict[int, float]
    stop: tuple[str, ...]
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    num_ctx: int | None  # Ollama's per-request context cap; None: the slot's full context
    ignore_eos: bool = False  # llama-server's: never sample an end-of-generation token


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5,000-digit number, [[[[...]]]]
        raise APIError(
            400, f"We could not parse the JSON body of your request: {e}", code="invalid_json"
        ) from e
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_strings(data)
    return data


def _check_strings(data: Any) -> None:
    """Refuse strings no UTF-8 text can hold: JSON escapes such as \\ud800 decode to lone surrogates."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                message = (
                    "The request contains a lone UTF-16 surrogate escape (\\ud800-\\udfff): not valid text."
                )
                raise APIError(400, message, code="invalid_json") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def merged_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Top-level fields plus Ollama `options` aliases (top level wins); null counts as absent."""
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise invalid_type("options", "an object", options)
    fields: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if name in OLLAMA_IGNORED:
            continue
        target = OLLAMA_ALIASES.get(name)
        if target is not None and value is not None:
            fields[target] = (f"options.{name}", value)
    for name, value in body.items():
        if value is not None:
            fields[name] = (name, value)
    return fields


def check_model(body: dict[str, Any], served_names: frozenset[str]) -> None:
    """Accept a missing model or one of the served model's names; anything else is OpenAI's 404."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    if model and model not in served_names:
        raise APIError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


def parse_generation_options(
    body: dict[str, Any], *, chat: bool, n_ctx: int, n_vocab: int
) -> GenerationOptions:
    """Validate the sampling and output fields shared by /v1/completions and /v1/chat/completions."""
    f = merged_fields(body)

    n = _int(f, "n", lo=1, hi=None)
    if n not in (None, 1):
        raise invalid_value("n", f"Invalid 'n': {n}. This server generates one choice per request (n=1).")
    _refuse_unless(f, "best_of", (1,), "best_of other than 1 is not supported")
    _refuse_unless(f, "presence_penalty", (0, 0.0), "presence_penalty is not supported; use repeat_penalty")
    _refuse_unless(f, "frequency_penalty", (0, 0.0), "frequency_penalty is not supported; use repeat_penalty")
    _refuse_unless(f, "echo", (False,), "echo is not supported")
    _refuse_unless(f, "suffix", ("",), "suffix (fill-in-the-middle) is not supported")
    _refuse_unless(f, "tools", ([],), "tools are not supported by this server")
    fmt = f.get("response_format")
    if fmt is not None and fmt[1] != {"type": "text"}:
        raise invalid_value("response_format", "Only response_format {'type': 'text'} is supported.")

    max_tokens = _max_tokens(f, n_ctx)
    num_ctx = _int(f, "num_ctx", lo=1, hi=None)

    stream = _bool(f, "stream", False)
    stream_options = f.get("stream_options")
    include_usage = False
    if stream_options is not None:
        name, value = stream_options
        if not isinstance(value, dict):
            raise invalid_type(name, "an object", value)
        if not stream:
            raise invalid_value(name, "stream_options are only allowed when 'stream' is true.")
        usage = value.get("include_usage", False)
        if not isinstance(usage, bool):
            raise invalid_type(f"{name}.include_usage", "a boolean", usage)
        include_usage = usage

    if chat:
        logprobs = _bool(f, "logprobs", False)
        top = _int(f, "top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise invalid_value("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        top_logprobs = top or 0
    else:
        top = _int(f, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        logprobs, top_logprobs = top is not None, top or 0

    seed = _int(f, "seed", lo=-1, hi=2**64 - 1)
    repeat_last_n = _int(f, "repeat_last_n", lo=-1, hi=None)
    given = {
        "temperature": _float(f, "temperature", lo=0.0, hi=None),
        "top_k": _int(f, "top_k", lo=0, hi=None),
        "top_p": _float(f, "top_p", lo=0.0, hi=1.0),
        "min_p": _float(f, "min_p", lo=0.0, hi=1.0),
        "repeat_penalty": _float(f, "repeat_penalty", lo=0.0, hi=None, lo_open=True),
        "repeat_last_n": n_ctx if repeat_last_n == -1 else repeat_last_n,
        "seed": None if seed == -1 else seed,
    }
    sampling = SamplingParams(**{k: v for k, v in given.items() if v is not None}, dry=_dry(f))

    return GenerationOptions(
        max_tokens=max_tokens,
        sampling=sampling,
        logit_bias=_logit_bias(f, n_vocab),
        stop=_stop(f),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        stream=stream,
        include_usage=include_usage,
        num_ctx=num_ctx,
        ignore_eos=_bool(f, "ignore_eos", False),
    )


def parse_prompt(body: dict[str, Any], n_vocab: int) -> str | list[int]:
    """A completion prompt: a string or a list of token ids (or a list holding exactly one of those)."""
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(
            400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise invalid_value("prompt", "Batched prompts are not supported: send one prompt per request.")
    if isinstance(prompt, list):
        return token_ids(prompt, "prompt", n_vocab)
    raise invalid_type("prompt", "a string or an array of token ids", prompt)


def token_ids(value: Any, param: str, n_vocab: int) -> list[int]:
    """A list of in-vocabulary token ids, or a 400."""
    if not isinstance(value, list):
        raise invalid_type(param, "an array of integers", value)
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise invalid_type(f"{param}[{i}]", "an integer", t)
        if not 0 <= t < n_vocab:
            raise invalid_value(
                f"{param}[{i}]", f"Invalid token id {t}: the vocabulary has ids 0..{n_vocab - 1}."
            )
    return list(value)


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat messages normalised for a chat template: text content only, `developer` treated as `system`."""
    if "messages" not in body or body["messages"] is None:
        raise APIError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    messages = body["messages"]
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise invalid_value("messages", "'messages' must contain at least one message.")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid_type(param, "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid_type(f"{param}.role", "a string", role)
        if role not in CHAT_ROLES:
            raise invalid_value(
                f"{param}.role", f"Invalid role '{role}': expected one of {', '.join(CHAT_ROLES)}."
            )
        content = _message_text(m.get("content"), f"{param}.content", allow_null=role == "assistant")
        message = {"role": "system" if role == "developer" else role, "content": content}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def parse_text_field(body: dict[str, Any], name: str) -> str:
    """A required string field (e.g. /tokenize's `content`)."""
    if name not in body:
        raise APIError(
            400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    value = body[name]
    if not isinstance(value, str):
        raise invalid_type(name, "a string", value)
    return value


def parse_bool_field(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_type(name, "a boolean", value)
    return value


def _message_text(content: Any, param: str, allow_null: bool) -> str:
    if content is None:
        if allow_null:
            return ""
        raise APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_type(param, "a string or an array of content parts", content)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise invalid_type(f"{param}[{j}]", "an object", part)
        if part.get("type") != "text":
            raise invalid_value(
                f"{param}[{j}].type", f"Unsupported content part type {part.get('type')!r}: only 'text'."
            )
        if not isinstance(part.get("text"), str):
            raise invalid_type(f"{param}[{j}].text", "a string", part.get("text"))
        texts.append(part["text"])
    return "".join(texts)


def _max_tokens(f: dict[str, Any], n_ctx: int) -> int | None:
    # `max_completion_tokens` is the newer OpenAI chat name; Ollama's num_predict arrives here as max_tokens
    # (-1 there means "no limit").
    name = "max_completion_tokens" if "max_completion_tokens" in f else "max_tokens"
    if name not in f:
        return None
    param, value = f[name]
    if param == "options.num_predict" and value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    if value < 1:
        raise invalid_value(param, f"Invalid '{param}': {value}. Expected a value >= 1.")
    if value > n_ctx:
        raise invalid_value(
            param, f"'{param}' is too large: {value}. This model supports at most {n_ctx} tokens of context."
        )
    return value


def _stop(f: dict[str, Any]) -> tuple[str, ...]:
    if "stop" not in f:
        return ()
    param, value = f["stop"]
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid_type(param, "a string or an array of strings", value)
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid_value(
            param, f"At most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}."
        )
    return tuple(s for s in stops if s)


def _dry(f: dict[str, Any]) -> DryParams:
    """llama-server's DRY fields (its defaults where absent; a dry_base below 1 is refused, not replaced)."""
    given = {
        "multiplier": _float(f, "dry_multiplier", lo=0.0, hi=None),
        "base": _float(f, "dry_base", lo=1.0, hi=None),
        "allowed_length": _int(f, "dry_allowed_length", lo=0, hi=None),
        "penalty_last_n": _int(f, "dry_penalty_last_n", lo=-1, hi=None),
        "sequence_breakers": _dry_breakers(f),
    }
    return DryParams(**{k: v for k, v in given.items() if v is not None})


def _dry_breakers(f: dict[str, Any]) -> tuple[str, ...] | None:
    if "dry_sequence_breakers" not in f:
        return None
    param, value = f["dry_sequence_breakers"]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid_type(param, "an array of strings", value)
    if not value:
        raise invalid_value(param, f"'{param}' must be a non-empty array of strings.")
    if len(value) > MAX_DRY_BREAKERS:
        raise invalid_value(
            param, f"At most {MAX_DRY_BREAKERS} sequence breakers are supported, got {len(value)}."
        )
    if "" in value:
        raise invalid_value(param, f"Invalid '{param}': an empty string breaks nothing.")
    return tuple(value)


def _logit_bias(f: dict[str, Any], n_vocab: int) -> dict[int, float]:
    if "logit_bias" not in f:
        return {}
    param, value = f["logit_bias"]
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    bias = {}
    for key, b in value.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid_value(param, f"Invalid logit_bias key {key!r}: expected a token id.") from None
        if not 0 <= token < n_vocab:
            raise invalid_value(
                param, f"Invalid logit_bias key {token}: the vocabulary has ids 0..{n_vocab - 1}."
            )
        if isinstance(b, bool) or not isinstance(b, int | float) or not -100 <= b <= 100:
            raise invalid_value(
                param, f"Invalid logit_bias value for {token}: expected a number in [-100, 100]."
            )
        bias[token] = float(b)
    return bias


def _refuse_unless(f: dict[str, Any], name: str, allowed: tuple[Any, ...], message: str) -> None:
    if name in f and not any(f[name][1] == a and type(f[name][1]) is type(a) for a in allowed):
        raise invalid_value(f[name][0], f"{message} (got {f[name][1]!r}).")


def _bool(f: dict[str, Any], name: str, default: bool) -> bool:
    if name not in f:
        return default
    param, value = f[name]
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


def _int(f: dict[str, Any], name: str, *, lo: int | None, hi: int | None) -> int | None:
    if name not in f:
        return None
    param, value = f[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise invalid_value(param, f"Invalid '{param}': {value}. Expected a value in {bounds}.")
    return value


def _float(
    f: dict[str, Any], name: str, *, lo: float, hi: float | None, lo_open: bool = False
) -> float | None:
    if name not in f:
        return None
    param, value = f[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(param, "a number", value)
    value = float(value)
    too_low = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or too_low or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise invalid_value(param, f"Invalid '{param}': {value}. Expected a value in {bounds}.")
    return value
