"""Distillation teachers: next-token distributions for a batch, for the KL term of the loss.

The loss adds weight · T² · KL(p_teacher ‖ p_student) at temperature T (`backend.kl_to_teacher`). A teacher
returns, for every position of a `[B, T]` batch of token ids, the ids and probabilities of its distribution
over the next token: the full vocabulary, or its top-k renormalised.

- `EngineTeacher`: a local model through `ternary.Engine.logits(ids)` (any object with that method).
- `ServerTeacher`: an OpenAI-compatible server's `/v1/completions` with `logprobs` (urllib, no extra
  dependency). One request per sequence with `echo` (prompt logprobs, as vLLM and OpenAI's legacy API give);
  servers that refuse `echo` get one `max_tokens: 1` request per position instead. Legacy `top_logprobs` are
  keyed by token text, mapped back to ids with the student's tokenizer; texts several tokens share (partial
  UTF-8 pieces) are dropped and the rest renormalised.

Both need the teacher to use the student's tokenizer (same ids); a different vocabulary is an error.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from ternary.training.config import DistillConfig


class TeacherError(RuntimeError):
    """The teacher cannot give usable targets (wrong vocabulary, unreachable server, malformed reply)."""


class Teacher(Protocol):
    def targets(self, ids: np.ndarray, temperature: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [B·T, k], probs float32 [B·T, k]): the next-token distribution at every position."""
        ...


def distribution_from_logits(
    logits: np.ndarray, temperature: float, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """softmax(logits / T) per row, all of it (top_k = 0) or its top k renormalised; rows are positions."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    n, v = z.shape
    if top_k and top_k < v:
        ids = np.argpartition(-z, top_k - 1, axis=1)[:, :top_k]
        z = np.take_along_axis(z, ids, axis=1)
    else:
        ids = np.broadcast_to(np.arange(v), (n, v))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(ids, dtype=np.int64), p.astype(np.float32)


class EngineTeacher:
    """A local teacher: `engine.logits(ids)` must give float logits [len(ids), n_vocab] for every position."""

    def __init__(self, engine: Any, n_vocab: int):
        self.engine = engine
        self.n_vocab = n_vocab

    def targets(self, ids: np.ndarray, temperature: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        rows_ids, rows_p = [], []
        for seq in np.asarray(ids):
            logits = np.asarray(self.engine.logits([int(t) for t in seq]))
            if logits.shape != (len(seq), self.n_vocab):
                raise TeacherError(
                    f"teacher logits have shape {logits.shape}, expected ({len(seq)}, {self.n_vocab}): the "
                    "teacher must score every position with the student's vocabulary"
                )
            i, p = distribution_from_logits(logits, temperature, top_k)
            rows_ids.append(i)
            rows_p.append(p)
        return np.concatenate(rows_ids), np.concatenate(rows_p)


def token_text_table(tokenizer_metadata: Mapping[str, Any]) -> dict[str, int]:
    """Token text (as a server prints it: the token's bytes decoded as UTF-8 with replacement) → id, for texts
    that exactly one token has."""
    from ternary.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(dict(tokenizer_metadata))
    table: dict[str, int] = {}
    shared: set[str] = set()
    for i in range(tok.n_vocab):
        text = tok.token_bytes(i).decode("utf-8", errors="replace")
        if text in table:
            shared.add(text)
        table[text] = i
    for text in shared:
        del table[text]
    return table


class ServerTeacher:
    """A teacher behind an OpenAI-compatible `/v1/completions` endpoint that returns `logprobs`."""

    def __init__(
        self,
        url: str,
        token_ids: Mapping[str, int],
        top_k: int = 20,
        model: str = "",
        timeout: float = 120.0,
    ):
        self.url = url.rstrip("/") + (
            "" if url.rstrip("/").endswith("/v1/completions") else "/v1/completions"
        )
        self.token_ids = dict(token_ids)
        self.top_k = top_k
        self.model = model
        self.timeout = timeout
        self.echo = True  # turned off for good after a server refuses it

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.model:
            body = {"model": self.model, **body}
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:300]
            raise TeacherError(f"{self.url}: HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise TeacherError(f"{self.url}: no usable reply: {exc}") from exc

    def _top(self, entry: Any) -> dict[int, float]:
        """{id: logprob} from one position's top logprobs (legacy dict or a list of {id|token, logprob})."""
        out: dict[int, float] = {}
        items = (
            entry.items()
            if isinstance(entry, dict)
            else ((e.get("id", e.get("token")), e["logprob"]) for e in entry)
        )
        for key, lp in items:
            tid = key if isinstance(key, int) else self.token_ids.get(key)
            if tid is not None and lp is not None and math.isfinite(lp):
                out[tid] = max(out.get(tid, -math.inf), float(lp))
        return out

    def _sequence(self, seq: Sequence[int]) -> list[dict[int, float]]:
        """Top logprobs of the next token after each prefix seq[:t+1], t = 0..len(seq)-1."""
        k = self.top_k
        if self.echo:
            try:
                reply = self._post(
                    {"prompt": list(seq), "max_tokens": 1, "echo": True, "logprobs": k, "temperature": 0}
                )
                tops = reply["choices"][0]["logprobs"]["top_logprobs"]
                if len(tops) >= len(seq) + 1:
                    return [self._top(e or {}) for e in tops[1 : len(seq) + 1]]
            except TeacherError as exc:
                if "echo" not in str(exc):
                    raise
            except (KeyError, IndexError, TypeError):
                pass
            self.echo = False
        out = []
        for t in range(len(seq)):
            reply = self._post(
                {"prompt": list(seq[: t + 1]), "max_tokens": 1, "logprobs": k, "temperature": 0}
            )
            try:
                out.append(self._top(reply["choices"][0]["logprobs"]["top_logprobs"][0]))
            except (KeyError, IndexError, TypeError) as exc:
                raise TeacherError(f"{self.url}: reply has no choices[0].logprobs.top_logprobs[0]") from exc
        return out

    def targets(self, ids: np.ndarray, temperature: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        k = top_k or self.top_k
        rows = [top for seq in np.asarray(ids) for top in self._sequence([int(t) for t in seq])]
        out_ids = np.zeros((len(rows), k), dtype=np.int64)
        out_p = np.zeros((len(rows), k), dtype=np.float32)
        for r, top in enumerate(rows):
            best = sorted(top.items(), key=lambda kv: -kv[1])[:k]
            if not best:
                continue  # nothing usable at this position: it adds no KL
            lp = np.array([v for _, v in best]) / temperature
            p = np.exp(lp - lp.max())
            out_ids[r, : len(best)] = [i for i, _ in best]
            out_p[r, : len(best)] = p / p.sum()
        return out_ids, out_p


def make_teacher(cfg: DistillConfig, tokenizer_metadata: Mapping[str, Any] | None, n_vocab: int) -> Teacher:
    """The teacher named by `distill.teacher` (a .gguf path for ternary.Engine, or an http(s) URL), checked
    against the student's vocabulary size `n_vocab` where the teacher states its own."""
    if cfg.teacher.startswith(("http://", "https://")):
        if not tokenizer_metadata:
            raise TeacherError("distill.teacher is a server, but the data has no tokenizer to map its tokens")
        return ServerTeacher(cfg.teacher, token_text_table(tokenizer_metadata), cfg.top_k or 20, cfg.model)
    if cfg.teacher.endswith(".gguf"):
        from ternary import Engine

        engine = Engine(cfg.teacher)
        if engine.config.n_vocab != n_vocab:
            raise TeacherError(
                f"distill.teacher {cfg.teacher}: vocabulary {engine.config.n_vocab} != the student's "
                f"{n_vocab}; teacher and student must share one tokenizer"
            )
        return EngineTeacher(engine, n_vocab)
    raise TeacherError(f"distill.teacher {cfg.teacher!r}: expected a .gguf path or an http(s):// URL")
