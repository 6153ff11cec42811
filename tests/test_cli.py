"""``ternary-run``: llama.cpp's flags, the completion on stdout, timing lines on stderr, one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ORACLE, run_click
from ternary.engine.cli import main
from ternary.engine.engine import Engine

MODEL = str(ORACLE / "tiny-tq2_0-f16.gguf")


pytestmark = pytest.mark.usefixtures("restore_numba_threads")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_click(main, capsys, *args)


def test_greedy_completion_and_timings(capsys: pytest.CaptureFixture[str]) -> None:
    with Engine(MODEL, threads=1) as llm:
        want = llm.generate("def f(x):", max_tokens=8, temperature=0, stream=False)
        n_prompt = len(llm.tokenize("def f(x):"))
    code, out, err = run_cli(capsys, MODEL, "-p", "def f(x):", "-n", "8", "--temp", "0", "-t", "1", "-s", "3")
    assert code == 0
    assert out == "def f(x):" + want + "\n"
    assert re.search(r"load time = +[\d.]+ ms", err)
    rate = r"\( *[\d.]+ ms per token, +[\d.]+ tokens per second\)"
    assert re.search(rf"prompt eval time = +[\d.]+ ms / +{n_prompt} tokens {rate}", err)
    assert re.search(r"\n +eval time = +[\d.]+ ms / +8 runs", err)
    assert re.search(rf"total time = +[\d.]+ ms / +{n_prompt + 8} tokens", err)


def test_model_flag_prompt_file_and_no_display_prompt(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("x = ", encoding="utf-8")
    args = ["-n", "4", "--temp", "0", "-t", "1", "-c", "64", "--act-quant", "per-token", "--ffn-act", "relu2"]
    code, shown, _ = run_cli(capsys, "-m", MODEL, "-f", str(prompt), *args)
    assert code == 0 and shown.startswith("x = ")
    code, hidden, _ = run_cli(capsys, "-m", MODEL, "-p", "x = ", "--no-display-prompt", *args)
    assert code == 0 and "x = " + hidden == shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([str(ORACLE / "missing.gguf"), "-p", "x"], "missing.gguf: no such file"),
        ([str(ORACLE), "-p", "x"], "is a directory"),
        ([str(ORACLE / "README.md"), "-p", "x"], "README.md"),
        ([MODEL, "-p", "x", "-f", "p.txt"], "either -p/--prompt or -f/--file"),
        ([MODEL, "-f", "/no/such/prompt.txt"], "cannot read the prompt file"),
        ([MODEL, "--act-quant", "int4"], "unknown activation quantization"),
        ([MODEL, "--ffn-act", "gelu"], "unknown --ffn-act"),
        ([MODEL, "--top-k", "many"], "'many' is not a valid integer"),
        ([MODEL, "--no-such-flag"], "No such option"),
        ([MODEL, "-c", "-5"], "--ctx-size"),
        ([MODEL, "-p", "x", "--top-p", "2"], "top_p"),
    ],
)
def test_errors_are_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, *args, "-t", "1")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("ternary-run: error: ")
    assert message in err


def test_entry_point_in_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ternary.engine.cli", "/no/such/model.gguf", "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr == "ternary-run: error: /no/such/model.gguf: no such file\n"
    assert "Traceback" not in proc.stderr


def test_no_model_runs_the_bundled_python_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TERNARY_MODEL", raising=False)
    code, out, _ = run_cli(capsys, "--prompt", "def fib(n):", "-n", "24", "--temp", "0", "-t", "1")
    assert code == 0
    assert out.startswith("def fib(n):") and len(out) > len("def fib(n):\n")


def test_no_model_and_a_missing_default_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TERNARY_MODEL", "/no/such/default.gguf")
    code, _, err = run_cli(capsys, "-p", "x", "-t", "1")
    assert code == 1
    assert err == "ternary-run: error: TERNARY_MODEL=/no/such/default.gguf: no such model file\n"
