"""ternary-eval: llama-perplexity's method against an independent log-softmax over Engine.logits, bits per
byte arithmetic, the code-eval header extraction / stop logic / parse check on hand-made completions, and the
bundled default model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ORACLE
from ternary.engine import evaluate
from ternary.engine.evaluate import (
    CodeDecoding,
    CompletionCut,
    EvalError,
    check_completion,
    cut_completion,
    extract_function_prompts,
    perplexity_of_tokens,
)
from ternary.engine.sampling import DryParams

ORACLE_MODEL = ORACLE / "tiny-tq2_0-f16.gguf"
SNIPPET = (ORACLE / "prompt.txt").read_text() + "\n"


@pytest.fixture(scope="module")
def oracle_engine():
    from ternary.engine.engine import Engine

    return Engine(ORACLE_MODEL, threads=1, n_ctx=64)


# ------------------------------------------------------------------------------------------ perplexity


def reference_perplexity(engine, text: str, n_ctx: int) -> tuple[float, int, int]:
    """llama-perplexity written out longhand: (total NLL, tokens scored, bytes scored)."""
    tok = engine.tokenizer
    tokens = tok.encode(text, add_bos=tok.add_bos, parse_special=False)
    nll, count, n_bytes = 0.0, 0, 0
    for c in range(len(tokens) // n_ctx):
        chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
        if tok.add_bos:
            chunk[0] = tok.bos_id
        logits = engine.logits(chunk).astype(np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            row = logits[j]
            log_z = math.log(sum(math.exp(v - row.max()) for v in row)) + row.max()
            target = tokens[c * n_ctx + j + 1]
            nll += log_z - row[target]
            count += 1
            n_bytes += len(tok.token_bytes(target, special=False))
    return nll, count, n_bytes


def test_perplexity_matches_longhand_reference_on_oracle_model(oracle_engine):
    text = SNIPPET * 6
    n_ctx = 16
    res = evaluate.perplexity(oracle_engine, text, n_ctx=n_ctx)
    nll, count, n_bytes = reference_perplexity(oracle_engine, text, n_ctx)
    n_tokens = len(oracle_engine.tokenizer.encode(text, add_bos=True, parse_special=False))
    assert oracle_engine.tokenizer.add_bos  # the BOS-replacement rule is exercised
    assert n_tokens % n_ctx  # and a partial last chunk is dropped
    assert res.n_chunks == n_tokens // n_ctx
    assert res.n_scored == count == res.n_chunks * (n_ctx // 2 - 1)
    assert res.n_bytes == n_bytes
    assert res.nll == pytest.approx(nll, rel=1e-9)
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-9)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-9)


def test_perplexity_needs_two_chunks(oracle_engine):
    with pytest.raises(EvalError, match="needs at least 64"):
        evaluate.perplexity(oracle_engine, "x = 1\n", n_ctx=32)
    with pytest.raises(EvalError, match="larger than the engine's context"):
        evaluate.perplexity(oracle_engine, SNIPPET * 20, n_ctx=128)


def uniform_logits(n_vocab: int, seen: list):
    def logits_fn(ids):
        seen.append(np.array(ids))
        return np.zeros((len(ids), n_vocab), dtype=np.float32)

    return logits_fn


def test_bits_per_byte_arithmetic_and_chunk_inputs():
    # uniform logits over V tokens: every scored token costs ln V nats, so PPL = V exactly and
    # bits per byte = scored tokens * log2(V) / their bytes
    n_vocab, n_ctx = 16, 8
    tokens = list(range(1, 16)) + [3] * 6  # 21 tokens: 2 chunks of 8, tail of 5 dropped
    byte_len = np.arange(n_vocab) % 4  # token t is t % 4 bytes long
    seen: list = []
    res = perplexity_of_tokens(uniform_logits(n_vocab, seen), tokens, n_ctx, bos_id=0, token_bytes=byte_len)
    scored = tokens[5:8] + tokens[13:16]  # positions 4..6 of each chunk predict tokens 5..7
    assert res.n_chunks == 2 and res.n_scored == 6
    assert res.ppl == pytest.approx(n_vocab)
    assert res.n_bytes == sum(t % 4 for t in scored)
    assert res.bits_per_byte == pytest.approx(6 * math.log2(n_vocab) / res.n_bytes)
    # the chunk's first token is replaced by BOS, the rest is the text as is
    assert [s.tolist() for s in seen] == [[0, *tokens[1:8]], [0, *tokens[9:16]]]
    seen.clear()
    perplexity_of_tokens(uniform_logits(n_vocab, seen), tokens, n_ctx, None, byte_len, max_chunks=1)
    assert [s.tolist() for s in seen] == [tokens[0:8]]


def test_scored_nll_is_log_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 7)).astype(np.float32) * 10
    targets = rng.integers(0, 7, size=5)
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(evaluate.scored_nll(logits, targets), -np.log(p[np.arange(5), targets]))


# ------------------------------------------------------------------------------------------- code eval

SOURCE = '''
import functools


def plain(a, b):
    return a + b


def documented(x):
    """Twice x.

    Longer text.
    """
    y = x * 2
    return y


def one_liner(x): return x


def only_doc():
    """Nothing else."""


@functools.cache
def wrapped(
    first,
    second=2,
):
    return first


class Box:
    def method(self, v):
        """Store v."""
        self.v = v
'''


def test_extract_function_prompts():
    assert sorted(p.name for p in extract_function_prompts(SOURCE)) == ["documented", "plain", "wrapped"]
    prompts = {p.name: p for p in extract_function_prompts(SOURCE, "box.py", methods=True)}
    assert sorted(prompts) == ["documented", "method", "plain", "wrapped"]
    assert prompts["plain"].prompt == "def plain(a, b):\n"
    assert (
        prompts["documented"].prompt == 'def documented(x):\n    """Twice x.\n\n    Longer text.\n    """\n'
    )
    assert prompts["wrapped"].prompt == "def wrapped(\n    first,\n    second=2,\n):\n"  # no decorator
    assert prompts["method"].prompt == 'def method(self, v):\n    """Store v."""\n'  # dedented to column 0
    assert prompts["method"].source.startswith("box.py:")
    assert extract_function_prompts("def broken(:\n", "x.py") == []


@pytest.mark.parametrize(
    ("generated", "kept"),
    [
        ("    return x\n\ndef other():\n    pass\n", "    return x\n\n"),  # dedent ends the body
        ("    x = 1\n\n\n    y = 2\n", "    x = 1\n\n"),  # two blank lines end it
        # ... but not inside an open docstring
        (
            '    """Doc.\n\n\n    More.\n    """\n    return 1\n',
            '    """Doc.\n\n\n    More.\n    """\n    return 1\n',
        ),
        ("    if x:\n        y()\n    return 2\nprint(1)", "    if x:\n        y()\n    return 2\n"),
        ("    return foo(1,\n        2", "    return foo(1,\n"),  # token limit: partial line dropped
        ("    return 1", ""),  # a line without its newline is not kept
        ("class X:\n", ""),
    ],
)
def test_cut_completion(generated, kept):
    assert cut_completion(generated) == kept


def test_completion_cut_streams_like_whole_text():
    text = "    a = [\n        1,\n    ]\n\n    return a\nfoo()\n"
    cut = CompletionCut()
    stopped_at = None
    for i, ch in enumerate(text):
        if cut.feed(ch):
            stopped_at = i
            break
    assert cut.text == cut_completion(text) == "    a = [\n        1,\n    ]\n\n    return a\n"
    assert text[stopped_at] == "f"  # stops as soon as a line starts at column 0


def test_check_completion():
    header = "def f(x):\n"
    ok = check_completion(header, "    return x + 1\n")
    assert ok.parses and ok.compiles and not ok.empty
    assert check_completion(header, "    # just a comment\n\n").empty
    assert not check_completion(header, "").parses
    bad = check_completion(header, "    return (x +\n")
    assert not bad.parses and "SyntaxError" in bad.error
    # parses but the compiler's symbol table rejects it
    nonlocal_ = check_completion(header, "    nonlocal y\n    return y\n")
    assert nonlocal_.parses and not nonlocal_.compiles


class CannedEngine:
    """An engine whose greedy completion is a fixed text, fed in small pieces."""

    n_ctx = 64

    def __init__(self, tokenizer, text: str):
        self.tokenizer, self.text, self.calls = tokenizer, text, []

    def generate(self, prompt, **kwargs):
        self.calls.append((list(prompt), kwargs))
        return iter([self.text[i : i + 3] for i in range(0, len(self.text), 3)])


def test_code_completion_plumbing(oracle_engine):
    prompts = extract_function_prompts(SOURCE)
    canned = CannedEngine(oracle_engine.tokenizer, "    return 1\n\n\nfoo = 2\n")
    res = evaluate.code_completion(canned, prompts, CodeDecoding(max_tokens=16))
    s = res.summary()
    assert s["n"] == len(prompts) and s["parses"] == s["compiles"] == len(prompts)
    assert all(sample["completion"] == "    return 1\n\n" for sample in res.samples)
    ids, kwargs = canned.calls[0]
    assert ids[0] == oracle_engine.tokenizer.bos_id and kwargs["temperature"] == 0.0
    assert kwargs["max_tokens"] == 16
    assert kwargs["repeat_penalty"] == 1.0 and kwargs["dry_multiplier"] == 0.0  # plain greedy by default


def test_every_decoding_setting_reaches_the_engine_and_the_report(oracle_engine):
    dry = DryParams(multiplier=0.8, base=2.0, allowed_length=3, penalty_last_n=100, sequence_breakers=())
    decoding = CodeDecoding(max_tokens=0, repeat_penalty=1.3, repeat_last_n=32, dry=dry)
    canned = CannedEngine(oracle_engine.tokenizer, "    return 1\n")
    res = evaluate.code_completion(canned, extract_function_prompts(SOURCE)[:1], decoding)
    ids, kwargs = canned.calls[0]
    expected = {"temperature": 0.0, "max_tokens": canned.n_ctx - len(ids), "repeat_penalty": 1.3,
                "repeat_last_n": 32, "dry_multiplier": 0.8, "dry_base": 2.0, "dry_allowed_length": 3,
                "dry_penalty_last_n": 100, "dry_sequence_breakers": [], "stream": True}  # fmt: skip
    assert kwargs == expected  # max_tokens 0: all the room the prompt leaves
    report = res.summary()["decoding"]
    assert report == {k: v for k, v in {**expected, "max_tokens": 0}.items() if k != "stream"}
    assert "--repeat-penalty 1.3" in res.line() and "--dry-multiplier 0.8" in res.line()
    assert "--dry-sequence-breaker none" in res.line()
    with pytest.raises(ValueError, match="max_tokens"):
        CodeDecoding(max_tokens=-1)
    with pytest.raises(ValueError, match="repeat_penalty"):
        CodeDecoding(repeat_penalty=0.0)


def write_functions(folder, docstring_lines: dict[str, int]) -> None:
    """One module per function `name` whose docstring has the given number of lines."""
    folder.mkdir(exist_ok=True)
    for name, n in docstring_lines.items():
        doc = "".join(f"    line {i} of the text\n" for i in range(n))
        (folder / f"{name}.py").write_text(f'def {name}(x):\n    """{name}.\n{doc}    """\n    return x\n')


def test_tasks_are_drawn_from_those_that_fit(tmp_path):
    sizes = {f"f{i}": (0 if i % 3 else 40) for i in range(12)}  # every third one has a long docstring
    write_functions(tmp_path / "all", sizes)
    write_functions(tmp_path / "short", {k: v for k, v in sizes.items() if v == 0})

    def short(p):
        return p.prompt.count("\n") < 10

    for limit in (None, 5):
        sel = evaluate.select_function_prompts(tmp_path / "all", limit, seed=3, fits=short)
        assert sel.n_found == 12 and sel.n_too_long == 4
        same = evaluate.function_prompts(tmp_path / "short", limit, seed=3)  # the sample of the fitting ones
        assert [p.name for p in sel.prompts] == [p.name for p in same]
        assert all(short(p) for p in sel.prompts) and len(sel.prompts) == (limit or 8)
    assert evaluate.select_function_prompts(tmp_path / "all", None).n_too_long == 0  # no rule: all eligible
    with pytest.raises(EvalError, match="none of the 12 functions fits"):
        evaluate.select_function_prompts(tmp_path / "all", 5, fits=lambda p: False)


def test_leaves_room_counts_the_prompt_tokens(oracle_engine):
    prompt = extract_function_prompts(SOURCE)[1]  # "documented"
    n_ids = len(oracle_engine.tokenizer.encode(prompt.prompt, add_bos=True, parse_special=False))
    room = oracle_engine.n_ctx - n_ids
    assert evaluate.leaves_room(oracle_engine, room)(prompt)
    assert not evaluate.leaves_room(oracle_engine, room + 1)(prompt)
    with pytest.raises(EvalError, match="at least 1"):
        evaluate.leaves_room(oracle_engine, 0)
    with pytest.raises(EvalError, match="leaves no room"):
        evaluate.leaves_room(oracle_engine, oracle_engine.n_ctx)


def test_greedy_completion_on_oracle_engine_is_cut(oracle_engine):
    # a random-weight model: the completion is noise, but it is cut to whole lines and checked without error
    completion = evaluate.complete(oracle_engine, "def f(x):\n", CodeDecoding(max_tokens=8))
    assert completion == "" or completion.endswith("\n")
    check = check_completion("def f(x):\n", completion)
    assert check.empty or check.parses or check.error
    dry = CodeDecoding(max_tokens=8, dry=DryParams(multiplier=0.8))  # DRY with llama.cpp's default breakers
    assert evaluate.complete(oracle_engine, "def f(x):\n", dry) == cut_completion(
        oracle_engine.generate("def f(x):\n", max_tokens=8, temperature=0, dry_multiplier=0.8, stream=False)
    )


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_perplexity_and_errors(tmp_path):
    text = tmp_path / "snippet.py"
    text.write_text(SNIPPET * 6)
    report_path = tmp_path / "r.json"
    runner = CliRunner()
    args = [str(ORACLE_MODEL), "--ppl", str(text), "--ctx", "16", "-t", "1", "--json", str(report_path)]
    result = runner.invoke(evaluate.main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["perplexity"]["n_ctx"] == 16 and "PPL = " in result.output
    for args, message in [
        ([str(ORACLE_MODEL)], "nothing to do"),
        ([str(tmp_path / "missing.gguf"), "--ppl", str(text)], "no such model file"),
        ([str(ORACLE_MODEL), "--ppl", str(tmp_path / "nowhere")], "no such file or folder"),
        ([str(ORACLE_MODEL), "--code"], "--code needs Python files"),
    ]:
        result = runner.invoke(evaluate.main, args)
        assert result.exit_code == 1 and message in result.output, result.output


def test_cli_code_eval_reports_fit_and_decoding(tmp_path):
    write_functions(tmp_path / "src", {f"f{i}": (0 if i % 2 else 30) for i in range(6)})  # 3 too long
    report_path = tmp_path / "code.json"
    args = [str(ORACLE_MODEL), "--code", "--code-src", str(tmp_path / "src"), "-c", "64", "-t", "1",
            "--code-min-room", "32", "--code-max-tokens", "4", "--code-n", "2", "--dry-multiplier", "0.5",
            "--dry-sequence-breaker", "none", "--dry-sequence-breaker", "\\n",
            "--json", str(report_path)]  # fmt: skip
    result = CliRunner().invoke(evaluate.main, args)
    assert result.exit_code == 0, result.output
    assert "3 of 6 held-out functions left out for length (< 32 tokens of room)" in result.output
    code = json.loads(report_path.read_text())["code_completion"]
    assert (code["n"], code["held_out_functions"], code["left_out_for_length"], code["min_room"]) == (
        2,
        6,
        3,
        32,
    )
    assert code["decoding"]["dry_multiplier"] == 0.5 and code["decoding"]["dry_sequence_breakers"] == ["\n"]
    assert code["decoding"]["max_tokens"] == 4 and code["decoding"]["temperature"] == 0.0
    assert {s["name"] for s in code["samples"]} <= {"f1", "f3", "f5"}
    for bad, message in [(["--dry-base", "0.5"], "dry_base must be"),
                         (["--code-min-room", "64"], "leaves no room"),
                         (["--code-max-tokens", "-1"], "max_tokens must be >= 0")]:  # fmt: skip
        result = CliRunner().invoke(evaluate.main, args[:-2] + bad)
        assert result.exit_code == 1 and message in result.output, result.output


# --------------------------------------------------------------------------------------- bundled model


def test_default_model_path_opens_the_shipped_model(monkeypatch):
    from ternary.formats.model_file import open_model
    from ternary.formats.tokenizer import Tokenizer

    from ternary.models import ENV_VAR, default_model_path

    monkeypatch.delenv(ENV_VAR, raising=False)
    path = default_model_path()
    assert path.name == "python-code.gguf" and path.stat().st_size < 12 << 20  # 23M params: 9.7 MB
    with open_model(path) as mf:
        assert mf.config.arch == "bitnet" and mf.config.n_vocab == 8192
        tok = Tokenizer.from_metadata(mf.gguf.metadata)
    code = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok.encode(code)) == code


def test_default_model_path_env_override(monkeypatch, tmp_path):
    from ternary.models import ENV_VAR, default_model_path

    monkeypatch.setenv(ENV_VAR, str(ORACLE_MODEL))
    assert default_model_path() == ORACLE_MODEL
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        default_model_path()


# ------------------------------------------------------------------------------------ the training recipe


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTrainer:
    """Steps cost `cost(step)` fake seconds; fit/save as the real Trainer's (fit runs to a total step)."""

    def __init__(self, clock, cost, steps=3000, step=0, ckpt_every=1000):
        from ternary.training.config import TrainConfig

        self.cfg = TrainConfig().replace({"schedule.steps": steps, "schedule.warmup_steps": 5,
                                          "run.ckpt_every": ckpt_every})  # fmt: skip
        self.clock, self.cost, self.step, self.tokens_seen, self.saved = clock, cost, step, 0, []

    def fit(self, steps):
        while self.step < steps:
            self.clock.now += self.cost(self.step)
            self.step += 1
        self.saved.append(self.step)

    def save(self):
        self.saved.append(self.step)


def run_budget(monkeypatch, trainer, seconds, fixed=False):
    from ternary.training import build_code_model

    monkeypatch.setattr(build_code_model.time, "perf_counter", trainer.clock)
    return build_code_model.train_to_budget(trainer, seconds, fixed, log=lambda m: None)


def test_budget_plans_the_schedule_to_fit(monkeypatch):
    t = FakeTrainer(FakeClock(), lambda s: 1.0)
    res = run_budget(monkeypatch, t, 600.0)
    # 13 steps measured, then 95% of the remaining 587 s at 1 s/step, re-planned while stable
    assert res["planned_steps"] == t.cfg.schedule.steps >= 13 + int(0.95 * 587)
    assert res["steps"] == res["planned_steps"] and not res["stopped_early"]
    assert 0.95 * 600 <= t.clock.now <= 600 and t.saved[-1] == res["steps"]
    assert all(b - a <= 60 for a, b in zip(t.saved, t.saved[1:], strict=False))  # a checkpoint a minute


def test_budget_shortens_the_plan_when_steps_slow_down(monkeypatch):
    t = FakeTrainer(FakeClock(), lambda s: 1.0 if s < 200 else 3.0)
    res = run_budget(monkeypatch, t, 600.0)
    assert res["steps"] == res["planned_steps"] < 13 + int(0.95 * 587)
    assert not res["stopped_early"] and t.clock.now <= 600 * 1.1


def test_budget_stops_and_saves_when_time_is_up(monkeypatch):
    t = FakeTrainer(FakeClock(), lambda s: 1.0 if s < 100 else 100.0)
    res = run_budget(monkeypatch, t, 300.0)
    assert res["stopped_early"] and res["steps"] < 13 + int(0.95 * 287)
    assert t.saved[-1] == res["steps"]  # checkpointed where it stopped (and export takes that one)


def test_budget_lengthens_the_plan_when_steps_speed_up(monkeypatch):
    t = FakeTrainer(FakeClock(), lambda s: 3.0 if s < 50 else 1.0)
    res = run_budget(monkeypatch, t, 600.0)
    assert res["planned_steps"] > 13 + int(0.95 * (600 - 39) / 3)  # beyond the first plan
    assert 0.85 * 600 < t.clock.now <= 600 and not res["stopped_early"]


def test_budget_never_lengthens_a_decaying_schedule_and_obeys_fixed_steps(monkeypatch):
    t = FakeTrainer(FakeClock(), lambda s: 1.0, steps=400, step=390)  # decay began at step 320
    assert run_budget(monkeypatch, t, 600.0)["steps"] == 400
    t = FakeTrainer(FakeClock(), lambda s: 1.0, steps=400, step=400)  # a finished run stays finished
    assert run_budget(monkeypatch, t, 600.0)["steps_this_run"] == 0
    t = FakeTrainer(FakeClock(), lambda s: 1.0, steps=50)
    assert run_budget(monkeypatch, t, 600.0, fixed=True)["steps"] == 50  # --steps: no planning


def test_python_sources_skip_tests_caches_and_big_files(tmp_path):
    from ternary.training.build_code_model import iter_python_files

    files = {"a.py": 10, "pkg/b.py": 10, "pkg/tests/t.py": 10, "test/x.py": 10, "__pycache__/c.py": 10}
    files.update({"site-packages/d.py": 10, "big.py": 5000, "e.txt": 1})
    for rel, size in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x" * size)
    found = [p.relative_to(tmp_path).as_posix() for p in iter_python_files(tmp_path, False, 1000)]
    assert found == ["a.py", "pkg/b.py"]
    with_tests = [p.relative_to(tmp_path).as_posix() for p in iter_python_files(tmp_path, True, 1000)]
    assert with_tests == ["a.py", "pkg/b.py", "pkg/tests/t.py", "test/x.py"]


def test_build_code_model_scores_the_card_decodings_on_tasks_that_fit(tmp_path, monkeypatch, oracle_engine):
    """evaluate_gguf: the model card's two decodings on the same tasks, drawn from functions leaving room."""
    from ternary.training import build_code_model

    monkeypatch.setattr(evaluate, "DEFAULT_CODE_MIN_ROOM", 16)
    monkeypatch.setattr(evaluate, "open_engine", lambda path, threads=None: oracle_engine)
    short = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(3))
    long_doc = "def g(x):\n    '''" + "word " * 200 + "'''\n    return x\n"
    (tmp_path / "a.py").write_text(short + long_doc)
    out = build_code_model.evaluate_gguf(ORACLE_MODEL, tmp_path, 0, 10, 1, log=lambda m: None)
    assert set(out) == {"code_completion", "code_completion_plain_greedy"}
    for key, penalty in build_code_model.CODE_REPEAT_PENALTIES.items():
        assert out[key]["decoding"]["repeat_penalty"] == penalty
        assert out[key]["n"] == 3 and out[key]["left_out_for_length"] == 1  # g's prompt fills n_ctx 64
        assert [s["name"] for s in out[key]["samples"]] == ["f0", "f1", "f2"]
