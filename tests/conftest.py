"""Shared fixtures: where ../shared (oracle GGUFs, vocab files, spec) lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    candidates = [os.environ.get("TERNARY_SHARED"), REPO / "shared", REPO.parent / "shared"]
    for c in candidates:
        if c and (Path(c) / "oracle").is_dir():
            return Path(c)
    raise RuntimeError(
        "cannot find the shared/ folder (oracle GGUFs, vocab files): expected it beside the checkout "
        f"({REPO.parent / 'shared'}) or set TERNARY_SHARED"
    )


SHARED = _find_shared()
ORACLE = SHARED / "oracle"
VOCAB = SHARED / "vocab"
ORACLE_MODELS = [
    "tiny-tq2_0-f16",
    "tiny-tq1_0-q6k",
    "tiny-tq2_0-scaletensors-q8",
    "tiny-tq2_0-blockscales-f16",
]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    return ORACLE


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return VOCAB


def read_ids(path: Path) -> list[int]:
    """Token ids of an oracle `*.tokens.txt` / `*.prompt_tokens.txt` file (comma-separated)."""
    return [int(t) for t in path.read_text().split(",")]


@pytest.fixture(scope="module")
def one_numba_thread():
    """One Numba thread for a module: on a busy 2-core machine a 2-thread parallel region can stall a whole
    time slice. The previous count is restored afterwards."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(previous)


@pytest.fixture(scope="module")
def restore_numba_threads():
    """For modules whose code under test sets the thread count itself (CLIs, benches)."""
    import numba

    previous = numba.get_num_threads()
    yield
    numba.set_num_threads(previous)


def run_click(main, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run a click entry point in-process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
