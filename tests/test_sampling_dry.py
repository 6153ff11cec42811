"""llama.cpp's DRY sampler: against a brute-force reference written from the definition (every candidate
token, every earlier position), hand-made histories with worked-out answers, breakers, the window, the
tokenization of breaker strings, the flags, and greedy decoding on a tiny oracle model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ORACLE, run_click
from ternary.engine.sampling import (
    DRY_DEFAULT_BREAKERS,
    DryBreakers,
    DryParams,
    Sampler,
    SamplingParams,
    apply_dry_penalty,
    breakers_from_flags,
    process_escapes,
)

MODEL = ORACLE / "tiny-tq2_0-f16.gguf"
A, B, C, D, S, T = 1, 2, 3, 4, 5, 6  # token ids of hand-made histories; S and T serve as breakers
V = 8


def reference_penalties(
    history: list[int],
    multiplier: float,
    base: float = 1.75,
    allowed_length: int = 2,
    last_n: int = -1,
    breakers: list[tuple[int, ...]] = (),
) -> dict[int, float]:
    """{token: penalty} from the definition, in plain Python and float64.

    Window: the last `last_n` tokens (-1: all). Breaker limit: the latest position where a whole breaker
    starts (the longest one there) leaves `limit` tokens after it; a match may span at most those. For each
    candidate t and each earlier position j followed by t, n_j = how many tokens ending at j equal the tokens
    ending at the window's end; n = max_j min(n_j, limit). One-token breakers are never penalized. Penalty:
    multiplier * base ** min(n - allowed_length, ln(FLT_MAX) / ln(base)) when n >= allowed_length.
    """
    if multiplier == 0 or last_n == 0:
        return {}
    window = list(history) if last_n < 0 else list(history[-last_n:])
    n = len(window)
    if n <= allowed_length:
        return {}
    limit = n
    for p in range(n - 1, -1, -1):
        whole = [len(b) for b in breakers if tuple(window[p : p + len(b)]) == tuple(b)]
        if whole:
            limit = n - p - max(whole)
            break
    if limit < allowed_length:
        return {}
    single = {b[0] for b in breakers if len(b) == 1}
    cap = int(88.7228391 / math.log(base)) if base > 1.000001 else None
    out = {}
    for t in set(window) - single:
        best = -1
        for j in range(n - 1):
            if window[j + 1] != t:
                continue
            k = 0
            while k <= j and window[j - k] == window[n - 1 - k]:
                k += 1
            best = max(best, min(k, limit))
        if best >= allowed_length:
            exponent = best - allowed_length if cap is None else min(best - allowed_length, cap)
            out[t] = multiplier * base**exponent
    return out


def penalties(history: list[int], multiplier: float, **kw) -> dict[int, float]:
    """{token: penalty} that apply_dry_penalty subtracted from zero logits."""
    out = apply_dry_penalty(np.zeros(V, dtype=np.float32), history, multiplier, **kw)
    return {int(t): float(-out[t]) for t in np.flatnonzero(out)}


# ------------------------------------------------------------------------------------- hand-made cases


def test_hand_made_histories_with_known_answers() -> None:
    m, b = 0.8, 1.75
    # "a b c a b": "c" would repeat "a b c"; llama.cpp counts the 2 tokens already repeated, so the exponent
    # is 2 - allowed_length = 0
    assert penalties([A, B, C, A, B], m) == pytest.approx({C: m})
    assert penalties([A, B, C, A, B], m, allowed_length=1) == pytest.approx({C: m * b})
    assert penalties([A, B, C, A, B], m, allowed_length=3) == {}
    # "a b c d a b c": "d" extends a repeat of 3 -> m * b ** (3 - 2)
    assert penalties([A, B, C, D, A, B, C], m) == pytest.approx({D: m * b})
    # overlapping matches: "a a a a" - the suffix "a a a" also ends one token earlier, followed by "a"
    assert penalties([A, A, A, A], m) == pytest.approx({A: m * b})
    # the longest match per token wins: "b" follows "c a" (2 tokens) and "d a" (1)
    assert penalties([C, A, B, D, A, B, C, A], m, allowed_length=1) == pytest.approx({B: m * b})


def test_breakers_stop_matches() -> None:
    m, b = 0.8, 1.75
    history = [A, S, B, C, D, A, S, B, C]
    assert penalties(history, m) == pytest.approx({D: m * b**2})  # "a S b c" repeated: 4
    assert penalties(history, m, breakers=[(S,)]) == pytest.approx({D: m})  # only "b c" after the last S
    assert penalties(history, m, breakers=[(S, B)]) == {}  # after the whole "S b" only "c": 1 < 2
    assert penalties(history, m, breakers=[(S, B)], allowed_length=1) == pytest.approx({D: m})
    assert penalties(history, m, breakers=[(S, C)]) == pytest.approx({D: m * b**2})  # "S c" never occurs
    assert penalties([A, B, C, A, B, S], m, breakers=[(S,)]) == {}  # a breaker last: nothing may repeat
    # a one-token breaker is never penalized itself, even when it would extend a repeat
    assert penalties([A, B, S, A, B], m) == pytest.approx({S: m})
    assert penalties([A, B, S, A, B], m, breakers=[(S,)]) == {}
    # the breaker that starts last limits matches (llama.cpp's backward scan), not the one that ends last:
    # "b c d" ends after "c" does, but "c" starts later and leaves "d a d", which repeats before "t"
    history = [D, A, D, T, B, C, D, A, D]
    assert penalties(history, m, breakers=[(B, C, D), (C,)]) == pytest.approx({T: m * b})
    assert penalties(history, m, breakers=[(B, C, D)]) == pytest.approx({T: m})  # "a d" after "b c d"


def test_penalty_last_n_is_the_window() -> None:
    m = 0.8
    history = [A, B, C, T, T, A, B]
    assert penalties(history, m) == pytest.approx({C: m})
    assert penalties(history, m, penalty_last_n=7) == pytest.approx({C: m})
    assert penalties(history, m, penalty_last_n=100) == pytest.approx({C: m})
    assert penalties(history, m, penalty_last_n=6) == {}  # the first "a" fell out: "c" follows only "b"
    assert penalties(history, m, penalty_last_n=0) == {}
    assert penalties([A, A], m) == {}  # no more tokens than allowed_length: nothing to do


def test_multiplier_zero_leaves_logits_bit_identical() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32)
    logits[5] = -np.inf
    history = rng.integers(0, 4, size=300).tolist()
    for kw in ({"multiplier": 0.0}, {"multiplier": 0.8, "penalty_last_n": 0}):
        out = apply_dry_penalty(logits, history, **kw)
        assert out is not logits and out.tobytes() == logits.tobytes()
    assert apply_dry_penalty(logits, history, 0.8).tobytes() != logits.tobytes()  # ... while it does act
    off = Sampler(SamplingParams(temperature=0.0, dry=DryParams(0.0)))
    on = Sampler(SamplingParams(temperature=0.0, dry=DryParams(50.0, sequence_breakers=())))
    best = int(np.argmax(logits))
    assert off.sample(logits, [best, 1, best, 1]) == best
    assert on.sample(logits, [best, 1, best, 1]) != best  # "x 1 x 1": x would repeat "x 1 x"


def test_exponent_is_capped_like_llama_cpp() -> None:
    history = [A, B] * 20  # "a" would extend a repeat of 38 tokens: 0.5 * 1000 ** 36 overflows float32
    got = penalties(history, 0.5, base=1000.0)
    assert set(got) == {A}
    assert got[A] == pytest.approx(0.5 * 1000.0**12, rel=1e-6)  # ln(FLT_MAX) / ln(1000) = 12.8
    assert math.isfinite(got[A])


def test_matches_brute_force_on_random_histories() -> None:
    rng = np.random.default_rng(7)
    breaker_sets = [[], [(S,)], [(S, B)], [(S,), (T, A, B)], [(T,), (T, A)], [(A, A, A)]]
    for _ in range(300):
        n = int(rng.integers(0, 40))
        alphabet = int(rng.integers(2, V))
        history = rng.integers(0, alphabet, size=n).tolist()
        kw = {
            "base": float(rng.choice([1.0, 1.75, 3.0])),
            "allowed_length": int(rng.integers(0, 4)),
            "last_n": int(rng.choice([-1, 0, 3, 10, 30])),
            "breakers": breaker_sets[int(rng.integers(len(breaker_sets)))],
        }
        multiplier = float(rng.uniform(0.1, 2.0))
        want = reference_penalties(history, multiplier, **kw)
        kw["penalty_last_n"] = kw.pop("last_n")
        got = penalties(history, multiplier, **kw)
        assert set(got) == set(want), (history, kw)
        for t in want:
            assert got[t] == pytest.approx(want[t], rel=1e-6)


def test_long_histories_agree_with_brute_force() -> None:
    rng = np.random.default_rng(3)
    phrase = rng.integers(0, V, size=50).tolist()
    history = (phrase * 3 + rng.integers(0, V, size=20).tolist() + phrase[:30]) * 2  # long repeats
    for kw in ({}, {"breakers": [(S,)]}, {"allowed_length": 5, "last_n": 150}):
        want = reference_penalties(history, 0.8, **kw)
        kw = {("penalty_last_n" if k == "last_n" else k): v for k, v in kw.items()}
        got = penalties(history, 0.8, **kw)
        assert set(got) == set(want) and all(got[t] == pytest.approx(want[t], rel=1e-6) for t in want)


# ------------------------------------------------------------------------------- parameters and inputs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"multiplier": -0.1}, "dry_multiplier"), ({"multiplier": math.nan}, "dry_multiplier"),
     ({"base": 0.5}, "dry_base"), ({"allowed_length": -1}, "dry_allowed_length"),
     ({"penalty_last_n": -2}, "dry_penalty_last_n"), ({"sequence_breakers": "\n"}, "list of strings"),
     ({"sequence_breakers": ["\n", 3]}, "list of strings"), ({"sequence_breakers": ["\n", ""]}, "empty")],
)  # fmt: skip
def test_bad_dry_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DryParams(**kwargs)


def test_inputs_that_cannot_work_are_named() -> None:
    assert DryParams(sequence_breakers=["\n"]).sequence_breakers == ("\n",)  # a list becomes a tuple
    with pytest.raises(ValueError, match="needs the tokenizer"):
        Sampler(SamplingParams(dry=DryParams(0.8)))
    Sampler(SamplingParams(dry=DryParams(0.8, sequence_breakers=())))  # no breakers: no tokenizer needed
    with pytest.raises(ValueError, match="outside the 8 logits"):
        apply_dry_penalty(np.zeros(V, dtype=np.float32), [A, B, 9, A, B], 0.8)
    with pytest.raises(ValueError, match="at least one token"):
        DryBreakers.from_sequences([()])


def test_flags_follow_llama_cpp() -> None:
    assert breakers_from_flags([]) == DRY_DEFAULT_BREAKERS == ("\n", ":", '"', "*")
    assert breakers_from_flags(["\\n"]) == ("\n",)  # the first flag replaces the defaults; escapes processed
    assert breakers_from_flags(["a", "none", "b", "c"]) == ("b", "c")
    assert breakers_from_flags(["none"]) == ()
    assert process_escapes(r"\t\x41\"\\q\'") == "\tA\"\\q'"


# -------------------------------------------------------------------------- breaker strings to tokens


def test_breaker_strings_become_tokens_as_in_llama_cpp() -> None:
    from ternary.formats.tokenizer import Tokenizer

    from ternary.models import default_model_path

    tok = Tokenizer.from_gguf(default_model_path())
    words = [tok.token_bytes(i) for i in range(tok.n_vocab)]  # gpt2 vocabulary: no space prefix to strip
    br = DryBreakers.from_text(tok, DRY_DEFAULT_BREAKERS)
    containing = {i for i, w in enumerate(words) if any(b.encode() in w for b in DRY_DEFAULT_BREAKERS)}
    assert set(br.single.tolist()) == containing and len(containing) > 50
    assert not br.rests  # one-character breakers have no partial overlaps
    assert DryBreakers.from_text(tok, DRY_DEFAULT_BREAKERS) is br  # cached per tokenizer

    br = DryBreakers.from_text(tok, ["return"])
    assert set(br.single.tolist()) == {i for i, w in enumerate(words) if b"return" in w}
    for head, rests in br.rests.items():
        word = words[head]
        assert b"return" not in word
        for rest in rests:  # the word ends with the start of "return"; the rest is its tokenized remainder
            remainder = tok.decode_bytes(rest, strip_leading_space=False)
            assert word.endswith(b"return"[: 6 - len(remainder)]) and b"return".endswith(remainder)
            assert list(rest) == tok.encode(remainder.decode(), parse_special=False)
    re_id = tok.token_to_id("re")
    turn = tok.encode("turn", parse_special=False)
    assert re_id is not None and tuple(turn) in br.rests[re_id]
    # "re" + "turn" spelled as separate tokens still breaks: only " c = d" after it may repeat
    after = tok.encode(" c = d", parse_special=False)
    seg = tok.encode("a = b ", parse_special=False) + [re_id, *turn] + after
    history, candidate = seg + seg[:-1], seg[-1]
    zeros = np.zeros(tok.n_vocab, dtype=np.float32)
    plain = apply_dry_penalty(zeros, history, 0.8)
    broken = apply_dry_penalty(zeros, history, 0.8, breakers=br)
    assert plain[candidate] == pytest.approx(-0.8 * 1.75 ** (len(seg) - 1 - 2), rel=1e-6)
    assert broken[candidate] == pytest.approx(-0.8 * 1.75 ** (len(after) - 1 - 2), rel=1e-6)


# ------------------------------------------------------------------------------ greedy decoding, CLI


@pytest.fixture(scope="module")
def engine():
    from ternary.engine.engine import Engine

    return Engine(MODEL, threads=1, n_ctx=64)


def decode_loop(
    engine, prompt: list[int], sampler: Sampler, steps: int
) -> tuple[list[int], list[np.ndarray]]:
    """Engine.generate's loop (prompt in one batch, then one token at a time), keeping each step's logits."""
    engine.reset_slot(0)
    n = len(prompt)
    logits = engine.eval_batch(prompt, np.arange(n), np.zeros(n, dtype=np.int32), np.arange(n) == n - 1)[0]
    history, rows = list(prompt), []
    for _ in range(steps):
        rows.append(logits)
        history.append(sampler.sample(logits, history))
        logits = engine.eval_batch([history[-1]], [len(history) - 1], [0])[0]
    return history[n:], rows


def test_greedy_with_dry_differs_from_greedy_only_where_a_penalty_applied(engine) -> None:
    prompt = engine.tokenize("def f(x):")
    steps = 40
    dry = DryParams(multiplier=0.8)

    def dry_sampler() -> Sampler:
        return Sampler(SamplingParams(temperature=0.0, dry=dry), engine.tokenizer)

    plain, _ = decode_loop(engine, prompt, Sampler(SamplingParams(temperature=0.0)), steps)
    tokens, rows = decode_loop(engine, prompt, dry_sampler(), steps)
    assert decode_loop(engine, prompt, dry_sampler(), steps)[0] == tokens  # deterministic
    changed = []
    breakers = dry_sampler().dry_breakers
    for i, raw in enumerate(rows):
        history = prompt + tokens[:i]
        penalized = apply_dry_penalty(raw, history, dry.multiplier, breakers=breakers)
        assert tokens[i] == int(np.argmax(penalized))
        top = int(np.argmax(raw))
        if tokens[i] != top:
            assert penalized[top] < raw[top]  # the plain choice was penalized
            changed.append(i)
    assert changed, "DRY never acted: the test would prove nothing"
    first = changed[0]
    assert tokens[:first] == plain[:first] and tokens[first] != plain[first]
    text = engine.generate(prompt, steps, temperature=0, dry_multiplier=0.8, ignore_eos=True, stream=False)
    assert text == engine.tokenizer.decode(tokens, special=False, strip_leading_space=False)


def test_ternary_run_dry_flags(engine, capsys: pytest.CaptureFixture[str]) -> None:
    from ternary.engine.cli import main

    dry = {"dry_multiplier": 0.8, "dry_base": 2.0, "dry_allowed_length": 1, "dry_sequence_breakers": [":"]}
    want = engine.generate("def f(x):", max_tokens=24, temperature=0, ignore_eos=True, stream=False, **dry)
    args = [str(MODEL), "-p", "def f(x):", "-n", "24", "--temp", "0", "-t", "1", "-c", "64", "--ignore-eos",
            "--dry-multiplier", "0.8", "--dry-base", "2", "--dry-allowed-length", "1",
            "--dry-sequence-breaker", "none", "--dry-sequence-breaker", ":"]  # fmt: skip
    code, out, _ = run_click(main, capsys, *args)
    assert code == 0 and out == "def f(x):" + want + "\n"
    code, _, err = run_click(main, capsys, str(MODEL), "-p", "x", "--dry-base", "0.5")
    assert code == 1 and "dry_base must be a finite number >= 1" in err and len(err.strip().splitlines()) == 1
