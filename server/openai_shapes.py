"""The JSON objects the OpenAI API returns, for chat and legacy completions, whole and as SSE chunks.

One `ResponseShaper` per request keeps the id, creation time and model name that every chunk of a stream
repeats. Logprobs come in two shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` and the
legacy completions' `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ternary.server.scheduler import Finished, TokenLogprob


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON object (or the literal [DONE])."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def timings(finished: Finished) -> dict[str, float]:
    """llama-server's `timings` block (extra field; OpenAI clients ignore it)."""
    n_gen = finished.completion_tokens
    return {
        "prompt_n": finished.prompt_tokens,
        "prompt_ms": round(finished.prompt_ms, 3),
        "predicted_n": n_gen,
        "predicted_ms": round(finished.predicted_ms, 3),
        "predicted_per_second": round(n_gen / (finished.predicted_ms / 1e3), 3)
        if finished.predicted_ms > 0
        else 0.0,
    }


class ResponseShaper:
    """Builds one request's response objects: `chat` selects chat.completion vs text_completion shapes."""

    def __init__(self, *, chat: bool, model: str, token_bytes: Callable[[int], bytes]) -> None:
        self.chat = chat
        self.model = model
        self.token_bytes = token_bytes
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- whole responses ----
    def response(
        self, text: str, finished: Finished, logprobs: Sequence[TokenLogprob] | None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self.logprobs(logprobs) if logprobs is not None else None
        choice["finish_reason"] = finished.reason
        out = self._envelope("chat.completion" if self.chat else "text_completion")
        out["choices"] = [choice]
        out["usage"] = usage(finished)
        out["timings"] = timings(finished)
        return out

    # ---- stream chunks ----
    def chunk(
        self,
        text: str | None = None,
        *,
        role: bool = False,
        finish_reason: str | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
                delta["content"] = ""
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self.logprobs(logprobs) if logprobs else None
        choice["finish_reason"] = finish_reason
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = [choice]
        return out

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(finished)
        out["timings"] = timings(finished)
        return out

    # ---- logprobs ----
    def logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        return self._chat_logprobs(entries) if self.chat else self._legacy_logprobs(entries)

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = self.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        content = []
        for e in entries:
            text, raw = self._token(e.token)
            top = []
            for t, lp in e.top:
                t_text, t_raw = self._token(t)
                top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
            content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _legacy_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries:
            tokens.append(self._token(e.token)[0])
            token_logprobs.append(e.logprob)
            top_logprobs.append({self._token(t)[0]: lp for t, lp in e.top})
            offsets.append(e.text_offset)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
