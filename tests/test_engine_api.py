"""The Engine API: tokens in/out, logits of a fresh context, generation (greedy, seeded, stop strings, EOG,
context limit, streaming), timing stats and the slot API."""

from __future__ import annotations

import numba
import numpy as np
import psutil
import pytest
from conftest import ORACLE
from ternary.engine import engine as engine_module
from ternary.engine.engine import Engine, default_threads
from ternary.formats.errors import GGUFError

MODEL = ORACLE / "tiny-tq2_0-f16.gguf"


@pytest.fixture(scope="module")
def llm():
    previous = numba.get_num_threads()
    with Engine(MODEL, threads=1, n_ctx=48, n_slots=2) as e:
        yield e
    numba.set_num_threads(previous)


def test_tokenize_matches_llama_cpp(llm: Engine) -> None:
    text = (ORACLE / "prompt.txt").read_text()
    want = [int(t) for t in (ORACLE / "tiny-tq2_0-f16.prompt_tokens.txt").read_text().split(",")]
    assert llm.tokenize(text) == want  # llama.cpp's tokenization, BOS first
    assert llm.tokenize(text, add_bos=False) == want[1:]
    assert llm.detokenize(want[1:]) == text


def test_logits_of_a_fresh_context(llm: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = llm.tokenize("def fibonacci(n):\n    return n")
    whole = llm.logits(ids)
    assert whole.shape == (len(ids), llm.n_vocab) and whole.dtype == np.float32
    monkeypatch.setattr(engine_module, "PROMPT_CHUNK", 4)  # the same prompt in chunks of 4
    np.testing.assert_allclose(llm.logits(ids), whole, atol=1e-4)
    np.testing.assert_allclose(llm.logits(ids[:5]), whole[:5], atol=1e-4)  # nothing leaks from the last run
    with pytest.raises(ValueError, match="do not fit the context"):
        llm.logits([1] * 49)
    with pytest.raises(ValueError, match="out of range"):
        llm.logits([llm.n_vocab])


def greedy_by_hand(llm: Engine, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(llm.logits(ids)[-1])))
    return ids


def test_greedy_generation(llm: Engine) -> None:
    prompt = llm.tokenize("def f(x):")
    ids = greedy_by_hand(llm, prompt, 6)
    text = llm.generate(prompt, max_tokens=6, temperature=0, stream=False)
    assert text == llm.tokenizer.decode(ids[len(prompt) :], special=False, strip_leading_space=False)
    assert "".join(llm.generate("def f(x):", max_tokens=6, temperature=0)) == text  # streamed, from text
    s = llm.stats
    assert (s.prompt_tokens, s.generated_tokens) == (len(prompt), 6)
    assert s.prompt_seconds > 0 and s.generation_seconds > 0 and s.load_seconds > 0


def test_seeded_sampling_repeats(llm: Engine) -> None:
    runs = [llm.generate("x = ", max_tokens=8, temperature=1.0, seed=s, stream=False) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_strings_end_the_text_and_are_not_emitted(llm: Engine) -> None:
    full = llm.generate("def f(x):", max_tokens=12, temperature=0, stream=False)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    assert llm.generate("def f(x):", max_tokens=12, temperature=0, stop=[stop], stream=False) == cut
    assert "".join(llm.generate("def f(x):", max_tokens=12, temperature=0, stop=["never", stop])) == cut
    assert llm.generate("def f(x):", max_tokens=12, temperature=0, stop="no such text", stream=False) == full


def test_end_of_generation_ids_stop_unless_ignored(llm: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = llm.tokenize("def f(x):")
    first = greedy_by_hand(llm, prompt, 1)[-1]
    monkeypatch.setattr(llm.tokenizer, "eog_ids", frozenset({first}))
    assert llm.generate(prompt, max_tokens=5, temperature=0, stream=False) == ""
    assert llm.stats.generated_tokens == 0
    llm.generate(prompt, max_tokens=5, temperature=0, ignore_eos=True, stream=False)
    assert llm.stats.generated_tokens == 5


def test_generation_stops_at_a_full_context(llm: Engine) -> None:
    prompt = llm.tokenize("a b c")
    llm.generate(prompt, max_tokens=-1, temperature=0, ignore_eos=True, stream=False)
    assert llm.stats.generated_tokens == llm.n_ctx - len(prompt)


def test_slot_api(llm: Engine) -> None:
    ids = llm.tokenize("print(1)")
    want = llm.logits(ids)
    assert (llm.n_slots, llm.n_ctx) == (2, 48)
    llm.reset_slot(1)
    got = llm.eval_batch(ids, np.arange(len(ids)), np.ones(len(ids), dtype=np.int32), logits_for=None)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_threads_and_bad_arguments() -> None:
    cores = psutil.cpu_count(logical=False) or 1
    assert default_threads() == min(cores, numba.config.NUMBA_NUM_THREADS)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        Engine(MODEL, threads=0)
    with pytest.raises(ValueError, match="n_slots"):
        Engine(MODEL, threads=1, n_slots=0)
    with pytest.raises(GGUFError, match="no-such-model.gguf: file: cannot open"):
        Engine(ORACLE / "no-such-model.gguf", threads=1)
    with pytest.raises(GGUFError, match="README.md"):
        Engine(ORACLE / "README.md", threads=1)


def test_engine_without_a_path_opens_the_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from ternary.models import ENV_VAR, default_model_path

    monkeypatch.delenv(ENV_VAR, raising=False)
    with Engine(threads=1) as llm:
        assert str(llm.path) == str(default_model_path())
        assert llm.config.n_vocab == 8192
        text = llm.generate("def fib(n):", max_tokens=8, temperature=0, stream=False)
        assert isinstance(text, str) and text
