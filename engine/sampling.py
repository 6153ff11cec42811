"""Token sampling with llama.cpp's semantics and order: penalties → DRY → top-k → top-p → min-p → temperature.

* repetition penalty: every distinct token among the last ``repeat_last_n`` of the history (0 = off, -1 = all)
  has its logit divided by the penalty if positive, multiplied by it otherwise;
* DRY ("Don't Repeat Yourself", llama.cpp's ``dry`` sampler, off while ``multiplier`` is 0): within the last
  ``penalty_last_n`` tokens (-1: all), a candidate token gets n = the length of the longest suffix of them
  that also occurs earlier followed by that candidate, counting only tokens already there (after "a b c a b",
  "c" has n = 2). A match never reaches back past the last sequence breaker, and a one-token breaker is never
  penalized. When n ≥ ``allowed_length`` the logit drops by ``multiplier * base ** (n - allowed_length)``,
  the exponent capped at ln(FLT_MAX) / ln(base) as in llama.cpp. Breakers are strings that llama.cpp turns
  into tokens once (`DryBreakers.from_text`): every token whose text contains a breaker is a one-token
  breaker; a token whose text ends with the start of a breaker begins a longer one, completed by the
  tokenization of the breaker's rest (cut to 20 tokens; breakers cut to 40 bytes). Not followed: a rest that
  starts inside a UTF-8 character (possible only for a breaker with non-ASCII text) is skipped, since our
  tokenizer takes text, not bytes;
* top-k keeps the k largest logits (k ≤ 0: all); top-p keeps the smallest prefix of the sorted candidates
  whose probability mass (softmax at temperature 1 over what is left) reaches p; min-p keeps tokens whose
  probability is at least ``min_p`` times the top one's; each keeps at least one token;
* temperature ≤ 0 is greedy (the largest penalized logit, lowest id on ties); otherwise logits / temperature,
  softmax, and one draw from the sampler's own ``numpy.random.Generator`` (a seed makes runs repeatable).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit

DRY_DEFAULT_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's common_params_sampling defaults
DRY_MAX_BREAKER_BYTES = 40  # llama.cpp cuts longer breakers to this many bytes ...
DRY_MAX_TAIL_TOKENS = 20  # ... and the tokens after a breaker's first to this many
FLOAT_MAX_LOG = np.float32(88.7228391)  # ln(FLT_MAX): caps DRY's exponent so the penalty stays finite


@dataclass(frozen=True)
class DryParams:
    """llama.cpp's DRY knobs with its defaults (``multiplier`` 0: off); errors name llama.cpp's fields."""

    multiplier: float = 0.0
    base: float = 1.75
    allowed_length: int = 2
    penalty_last_n: int = -1  # -1: the whole history, 0: off
    sequence_breakers: tuple[str, ...] = DRY_DEFAULT_BREAKERS

    def __post_init__(self) -> None:
        breakers = self.sequence_breakers
        if isinstance(breakers, str) or not all(isinstance(b, str) for b in breakers):
            raise ValueError(f"dry_sequence_breakers must be a list of strings, got {breakers!r}")
        object.__setattr__(self, "sequence_breakers", tuple(breakers))
        if "" in self.sequence_breakers:
            raise ValueError(f"dry_sequence_breakers: an empty string breaks nothing ({breakers!r})")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 0):
            raise ValueError(f"dry_multiplier must be a finite number >= 0 (0 = off), got {self.multiplier}")
        if not (math.isfinite(self.base) and self.base >= 1):
            raise ValueError(f"dry_base must be a finite number >= 1, got {self.base}")
        if self.allowed_length < 0:
            raise ValueError(f"dry_allowed_length must be >= 0, got {self.allowed_length}")
        if self.penalty_last_n < -1:
            raise ValueError(
                f"dry_penalty_last_n must be -1 (all), 0 (off) or positive, got {self.penalty_last_n}"
            )

    @property
    def enabled(self) -> bool:
        return self.multiplier > 0 and self.penalty_last_n != 0


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's sampling knobs with its defaults (``seed=None``: a random seed)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    dry: DryParams = field(default_factory=DryParams)

    def __post_init__(self) -> None:
        if not self.repeat_penalty > 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be -1 (all), 0 (off) or positive, got {self.repeat_last_n}")
        if not isinstance(self.dry, DryParams):
            raise ValueError(f"dry must be DryParams, got {type(self.dry).__name__}")


def apply_repetition_penalty(
    logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int = 64
) -> np.ndarray:
    """A penalized copy of ``logits``: each distinct id in the last ``last_n`` of ``history``, once."""
    out = np.array(logits, dtype=np.float32)
    if penalty == 1.0 or last_n == 0 or len(history) == 0:
        return out
    recent = history if last_n < 0 else history[-last_n:]
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / np.float32(penalty), vals * np.float32(penalty))
    return out


# ------------------------------------------------------------------------------------------------ DRY


_ESCAPE = re.compile(r"\\(x[0-7][0-9a-fA-F]|.)", re.DOTALL)
_ESCAPED = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def process_escapes(text: str) -> str:
    """llama.cpp's ``--escape`` (on by default) for a flag value: \\n \\r \\t \\' \\" \\\\ and ASCII
    \\xHH; any other backslash stays as written."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if len(code) == 3:
            return chr(int(code[1:], 16))
        return _ESCAPED.get(code, m.group(0))

    return _ESCAPE.sub(one, text)


def breakers_from_flags(values: Sequence[str]) -> tuple[str, ...]:
    """llama.cpp's repeatable ``--dry-sequence-breaker``: none given keeps the defaults, the first one
    replaces them, ``none`` empties the list so far; escapes such as ``\\n`` are processed."""
    if not values:
        return DRY_DEFAULT_BREAKERS
    out: list[str] = []
    for value in values:
        if value == "none":
            out.clear()
        else:
            out.append(process_escapes(value))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class DryBreakers:
    """Sequence breakers in tokens, arranged for `apply_dry_penalty`."""

    sequences: tuple[tuple[int, ...], ...]  # each breaker: its first token, then the rest
    single: np.ndarray  # sorted ids of the one-token breakers
    head_ids: np.ndarray  # sorted first ids of the longer ones
    rests: dict[int, tuple[tuple[int, ...], ...]]  # first id -> the rest of each longer breaker

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int]]) -> DryBreakers:
        seqs = tuple(dict.fromkeys(tuple(int(t) for t in s) for s in sequences))
        if any(not s for s in seqs):
            raise ValueError("a DRY sequence breaker needs at least one token")
        rests: dict[int, tuple[tuple[int, ...], ...]] = {}
        for s in seqs:
            if len(s) > 1:
                rests[s[0]] = (*rests.get(s[0], ()), s[1:])
        single = np.unique(np.array([s[0] for s in seqs if len(s) == 1], dtype=np.int64))
        return cls(seqs, single, np.array(sorted(rests), dtype=np.int64), rests)

    @classmethod
    def from_text(cls, tokenizer: Any, breakers: Sequence[str]) -> DryBreakers:
        """llama.cpp's tokenization of breaker strings (see the module docstring); cached per tokenizer."""
        return _breakers_of(tokenizer, tuple(breakers))


@functools.lru_cache(maxsize=32)
def _breakers_of(tokenizer: Any, breakers: tuple[str, ...]) -> DryBreakers:
    words = [tokenizer.decode_bytes([i]) for i in range(tokenizer.n_vocab)]  # llama.cpp's detokenize({id})
    found: list[tuple[int, ...]] = []
    for text in breakers:
        needle = text.encode("utf-8")[:DRY_MAX_BREAKER_BYTES]
        for tid, word in enumerate(words):
            if needle and needle in word:
                found.append((tid,))
                continue
            for pos in range(max(0, len(word) - len(needle) + 1), len(word)):
                if not needle.startswith(word[pos:]):
                    continue
                try:
                    rest = needle[len(word) - pos :].decode("utf-8")
                except UnicodeDecodeError:
                    continue  # a rest that starts inside a character (see the module docstring)
                tail = tokenizer.encode(rest, add_bos=False, parse_special=False)[:DRY_MAX_TAIL_TOKENS]
                found.append((tid, *tail))
    return DryBreakers.from_sequences(found)


@njit(cache=True)
def suffix_match_lengths(tokens: np.ndarray) -> np.ndarray:
    """lengths[j]: how many tokens ending at position j equal the tokens ending at the last position (j < n-1;
    lengths[n-1] = 0). The Z-function of the reversed sequence: O(n)."""
    n = tokens.shape[0]
    last = n - 1
    z = np.zeros(n, np.int64)  # z[k]: the match ending k tokens before the last one
    left = 0
    right = 0  # [left, right): the match reaching furthest back so far, in steps back from the end
    for k in range(1, n):
        m = 0
        if k < right:
            m = min(right - k, z[k - left])
        while k + m < n and tokens[last - m] == tokens[last - k - m]:
            m += 1
        z[k] = m
        if k + m > right:
            left = k
            right = k + m
    lengths = np.zeros(n, np.int64)
    for k in range(1, n):
        lengths[last - k] = z[k]
    return lengths


def _breaker_limit(window: np.ndarray, breakers: DryBreakers) -> int:
    """How many of the last tokens a match may span: those after the last breaker (llama.cpp's backward scan:
    the breaker starting latest wins; of several starting there, the longest)."""
    n = window.size
    starts = np.flatnonzero(np.isin(window, breakers.single))
    latest = int(starts[-1]) if starts.size else -1
    if breakers.rests:
        for p in np.flatnonzero(np.isin(window, breakers.head_ids))[::-1].tolist():
            if p < latest:
                break
            after = window[p + 1 :].tolist()
            lengths = [len(r) for r in breakers.rests[int(window[p])] if tuple(after[: len(r)]) == r]
            if lengths:
                return n - 1 - p - max(lengths)
    return n if latest < 0 else n - 1 - latest


def _max_exponent(base: float) -> int:
    """llama.cpp's cap on DRY's exponent (0: none, for bases this close to 1)."""
    b = np.float32(base)
    return int(FLOAT_MAX_LOG / np.log(b)) if b > np.float32(1.000001) else 0


def apply_dry_penalty(
    logits: np.ndarray,
    history: Sequence[int],
    multiplier: float,
    base: float = 1.75,
    allowed_length: int = 2,
    penalty_last_n: int = -1,
    breakers: DryBreakers | Iterable[Sequence[int]] = (),
) -> np.ndarray:
    """A copy of ``logits`` with llama.cpp's DRY penalty (module docstring); ``breakers`` in tokens."""
    out = np.array(logits, dtype=np.float32)
    if multiplier == 0 or base < 1 or penalty_last_n == 0:
        return out
    n = len(history) if penalty_last_n < 0 else min(len(history), penalty_last_n)
    if n <= allowed_length:
        return out
    window = np.asarray(history[len(history) - n :], dtype=np.int64)
    if window.min() < 0 or window.max() >= out.shape[0]:
        raise ValueError(f"history holds token ids outside the {out.shape[0]} logits")
    if not isinstance(breakers, DryBreakers):
        breakers = DryBreakers.from_sequences(breakers)
    limit = _breaker_limit(window, breakers)
    if limit < allowed_length:
        return out
    lengths = np.minimum(suffix_match_lengths(window)[:-1], limit)
    repeated = lengths >= allowed_length
    ids, inverse = np.unique(window[1:][repeated], return_inverse=True)
    longest = np.zeros(ids.size, dtype=np.int64)
    np.maximum.at(longest, inverse, lengths[repeated])
    keep = ~np.isin(ids, breakers.single)
    ids, exponent = ids[keep], longest[keep] - allowed_length
    cap = _max_exponent(base)
    if cap > 0:
        exponent = np.minimum(exponent, cap)
    # llama.cpp: float multiplier * pow(float base, int) in double, stored as float, subtracted in float
    penalty = (float(np.float32(multiplier)) * float(np.float32(base)) ** exponent.astype(np.float64)).astype(
        np.float32
    )
    out[ids] -= penalty
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_count(sorted_logits: np.ndarray, p: float) -> int:
    """How many of the descending ``sorted_logits`` top-p keeps: up to the first whose mass reaches p."""
    if p >= 1.0:
        return sorted_logits.shape[0]
    cum = np.cumsum(_softmax(sorted_logits.astype(np.float64)))
    return int(np.searchsorted(cum, p, side="left")) + 1 if cum[-1] >= p else sorted_logits.shape[0]


def min_p_count(sorted_logits: np.ndarray, min_p: float) -> int:
    """How many of the descending ``sorted_logits`` have probability ≥ ``min_p`` × the largest probability."""
    if min_p <= 0.0:
        return sorted_logits.shape[0]
    threshold = sorted_logits[0] + np.log(min_p)
    return max(1, int(np.count_nonzero(sorted_logits >= threshold)))


def candidates(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logits) that survive top-k, top-p and min-p, sorted by descending logit."""
    n = logits.shape[0]
    if 0 < top_k < n:
        ids = np.argpartition(-logits, top_k - 1)[:top_k]
    else:
        ids = np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    vals = logits[ids]
    keep = top_p_count(vals, top_p)
    keep = min(keep, min_p_count(vals[:keep], min_p))
    return ids[:keep], vals[:keep]


class Sampler:
    """Picks the next token from logits and the history so far, with its own seeded generator.

    ``tokenizer`` is needed only when DRY is on with sequence breakers (strings, found among its tokens)."""

    def __init__(self, params: SamplingParams | None = None, tokenizer: Any = None) -> None:
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)
        dry = self.params.dry
        if dry.enabled and dry.sequence_breakers:
            if tokenizer is None:
                raise ValueError(
                    "DRY sequence breakers are text: Sampler(params, tokenizer) needs the tokenizer to find "
                    "their tokens (or pass dry sequence_breakers=())"
                )
            self.dry_breakers = DryBreakers.from_text(tokenizer, dry.sequence_breakers)
        else:
            self.dry_breakers = DryBreakers.from_sequences(())

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        p = self.params
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ValueError(f"sample() needs one row of logits float32[n_vocab], got shape {logits.shape}")
        z = apply_repetition_penalty(logits, history, p.repeat_penalty, p.repeat_last_n)
        d = p.dry
        if d.enabled:
            z = apply_dry_penalty(
                z, history, d.multiplier, d.base, d.allowed_length, d.penalty_last_n, self.dry_breakers
            )
        if p.temperature <= 0:
            return int(np.argmax(z))
        ids, vals = candidates(z, p.top_k, p.top_p, p.min_p)
        probs = _softmax(vals.astype(np.float64) / p.temperature)
        return int(ids[self.rng.choice(ids.shape[0], p=probs)])
