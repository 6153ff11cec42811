"""Sampling with llama.cpp's semantics, on hand-made distributions whose expected survivors are known."""

from __future__ import annotations

import numpy as np
import pytest
from ternary.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    candidates,
    min_p_count,
    top_p_count,
)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)  # softmax(LOGITS) == PROBS
PLAIN = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}  # every filter off


def survivors(params: SamplingParams, logits: np.ndarray = LOGITS, draws: int = 3000) -> set[int]:
    sampler = Sampler(params)
    return {sampler.sample(logits) for _ in range(draws)}


def test_seed_makes_runs_repeatable() -> None:
    logits = np.random.default_rng(0).normal(size=500).astype(np.float32)
    a, b, c = (Sampler(SamplingParams(temperature=1.5, **PLAIN, seed=s)) for s in (7, 7, 8))
    seq_a = [a.sample(logits) for _ in range(50)]
    assert seq_a == [b.sample(logits) for _ in range(50)]
    assert seq_a != [c.sample(logits) for _ in range(50)]


def test_greedy_and_top_k_one() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(size=300).astype(np.float32)
        best = int(np.argmax(logits))
        assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == best
        assert Sampler(SamplingParams(temperature=0.8, top_k=1, seed=3)).sample(logits) == best


def test_top_k_top_p_min_p_keep_exactly_the_expected_tokens() -> None:
    assert survivors(SamplingParams(temperature=1.0, **{**PLAIN, "top_k": 2}, seed=0)) == {0, 1}
    assert survivors(SamplingParams(temperature=1.0, **{**PLAIN, "top_p": 0.75}, seed=0)) == {0, 1}
    assert survivors(SamplingParams(temperature=1.0, **{**PLAIN, "top_p": 0.85}, seed=0)) == {0, 1, 2}
    assert survivors(SamplingParams(temperature=1.0, **{**PLAIN, "top_p": 0.45}, seed=0)) == {0}
    # min-p: keep p >= min_p * p_max (0.5)
    assert survivors(SamplingParams(temperature=1.0, **{**PLAIN, "min_p": 0.2}, seed=0)) == {0, 1, 2}
    assert survivors(SamplingParams(temperature=1.0, **{**PLAIN, "min_p": 0.5}, seed=0)) == {0, 1}
    assert survivors(SamplingParams(temperature=1.0, **PLAIN, seed=0)) == {0, 1, 2, 3}


def test_top_p_sees_the_top_k_survivors_renormalized() -> None:
    """llama.cpp's order: top-k, then top-p over the renormalized rest ([.625, .375] reaches 0.6 at once)."""
    ids, _ = candidates(LOGITS, top_k=2, top_p=0.6, min_p=0.0)
    assert ids.tolist() == [0]
    ids, _ = candidates(LOGITS, top_k=0, top_p=0.6, min_p=0.0)
    assert ids.tolist() == [0, 1]


def test_filter_counts() -> None:
    sorted_logits = LOGITS  # already descending
    assert [top_p_count(sorted_logits, p) for p in (0.1, 0.75, 0.85, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    assert [min_p_count(sorted_logits, p) for p in (0.0, 0.05, 0.2, 0.5, 1.0)] == [4, 4, 3, 2, 1]


def test_temperature_one_samples_the_softmax() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, **PLAIN, seed=11))
    draws = np.bincount([sampler.sample(LOGITS) for _ in range(6000)], minlength=4) / 6000
    np.testing.assert_allclose(draws, PROBS, atol=0.025)
    cold = Sampler(SamplingParams(temperature=0.25, **PLAIN, seed=11))
    cold_draws = np.bincount([cold.sample(LOGITS) for _ in range(2000)], minlength=4) / 2000
    expected = PROBS**4 / (PROBS**4).sum()  # logits / 0.25
    np.testing.assert_allclose(cold_draws, expected, atol=0.03)


def test_repetition_penalty_as_llama_cpp() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    # positive logits are divided, negative ones multiplied; a repeated id is penalized once
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [0, 1, 1], 2.0), [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [0, 2, 1], 2.0, last_n=1), [2, -2, 0.5, 3])
    np.testing.assert_array_equal(apply_repetition_penalty(logits, [0, 2, 1], 2.0, last_n=0), logits)
    np.testing.assert_array_equal(
        apply_repetition_penalty(logits, [3] + [1] * 70, 2.0, last_n=-1), [2, -2, 0.5, 1.5]
    )
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0])  # the input is not modified
    greedy = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.1))
    assert greedy.sample(np.array([3.0, 2.9], dtype=np.float32), history=[0]) == 1
    assert greedy.sample(np.array([3.0, 2.9], dtype=np.float32), history=[]) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"repeat_penalty": 0.0}, "repeat_penalty"), ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p"),
     ({"repeat_last_n": -2}, "repeat_last_n")],
)  # fmt: skip
def test_bad_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="one row of logits"):
        Sampler().sample(np.zeros((2, 3), dtype=np.float32))
