"""Token sampling with llama.cpp's semantics and order: penalties → top-k → top-p → min-p → temperature.

* repetition penalty: every distinct token among the last ``repeat_last_n`` of the history (0 = off, -1 = all)
  has its logit divided by the penalty if positive, multiplied by it otherwise;
* top-k keeps the k largest logits (k ≤ 0: all); top-p keeps the smallest prefix of the sorted candidates
  whose probability mass (softmax at temperature 1 over what is left) reaches p; min-p keeps tokens whose
  probability is at least ``min_p`` times the top one's; each keeps at least one token;
* temperature ≤ 0 is greedy (the largest penalized logit, lowest id on ties); otherwise logits / temperature,
  softmax, and one draw from the sampler's own ``numpy.random.Generator`` (a seed makes runs repeatable).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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

    def __post_init__(self) -> None:
        if not self.repeat_penalty > 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be -1 (all), 0 (off) or positive, got {self.repeat_last_n}")


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
    """Picks the next token from logits and the history so far, with its own seeded generator."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        p = self.params
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ValueError(f"sample() needs one row of logits float32[n_vocab], got shape {logits.shape}")
        z = apply_repetition_penalty(logits, history, p.repeat_penalty, p.repeat_last_n)
        if p.temperature <= 0:
            return int(np.argmax(z))
        ids, vals = candidates(z, p.top_k, p.top_p, p.min_p)
        probs = _softmax(vals.astype(np.float64) / p.temperature)
        return int(ids[self.rng.choice(ids.shape[0], p=probs)])
