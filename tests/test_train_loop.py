"""The training loop end to end: loss falls on real text, SIGKILL-and-resume reproduces the uninterrupted run,
damaged checkpoints are skipped, gradient accumulation equals a big batch, warnings and errors are clear."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from ternary.training.checkpoint import checkpoint_path, list_checkpoints
from ternary.training.cli import main as cli_main
from ternary.training.config import ConfigError, TrainConfig, load_preset, preset_names
from ternary.training.trainer import ByteWindows, StepStats, Trainer, TrainingError


def python_source() -> bytes:
    """A few KB of real Python source (the standard library's JSON encoder)."""
    import json.encoder

    return Path(json.encoder.__file__).read_bytes()[:6000]


def tiny_config(tmp_path: Path, **sections) -> TrainConfig:
    (tmp_path / "src.py").write_bytes(python_source())
    d = {
        "model": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_ff": 64, "n_ctx_train": 32},
        "optim": {"name": "muon", "lr": 3e-3, "muon_lr": 0.02},
        "schedule": {"steps": 40, "warmup_steps": 4, "decay_frac": 0.25},
        "data": {"path": str(tmp_path / "src.py"), "seq_len": 32, "batch_size": 4},
        "run": {"out_dir": str(tmp_path / "run"), "log_every": 5, "ckpt_every": 10, "keep_last": 2},
    }
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return TrainConfig.from_dict(d)


def quiet(msg: str) -> None:
    pass


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> metrics, the last line for a step winning."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


CHILD = r"""
import os, sys, time
marker, block = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == block:  # freeze inside the checkpoint write, after the temp file is synced
        open(marker, "w").close()
        time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from ternary.training.cli import main
main(sys.argv[3:])
"""


def run_child(args: list[str], marker: Path, block: str = "") -> subprocess.Popen:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(marker), block, *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------- learning


def test_loss_falls_clearly_on_python_source(tmp_path):
    """Through the CLI in a child process with one BLAS thread: tiny matrices on a loaded 2-core machine
    run many times slower with OpenBLAS's thread pool than without."""
    cfg = tiny_config(
        tmp_path,
        model={"n_embd": 64, "n_head": 4, "n_head_kv": 4, "n_ff": 128, "n_ctx_train": 64},
        schedule={"steps": 100, "warmup_steps": 10, "decay_frac": 0.2},
        data={"seq_len": 64, "batch_size": 8},
        run={"ckpt_every": 1000, "log_every": 25},
    )
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    child = run_child(["train", "--config", str(config_file)], tmp_path / "unused")
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    assert "step    100/100 | loss" in out
    history = read_metrics(tmp_path / "run")
    first = history[1]["loss"]
    last = np.mean([history[s]["loss"] for s in range(91, 101)])
    assert first == pytest.approx(math.log(258), abs=0.15)  # an untrained model is near uniform
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"
    assert all(math.isfinite(h["grad_norm"]) for h in history.values())
    assert list_checkpoints(tmp_path / "run")[-1][0] == 100  # the last step is always saved


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = Trainer(
        tiny_config(tmp_path, data={"batch_size": 8}, run={"out_dir": str(tmp_path / "a")}), log=quiet
    )
    acc = Trainer(
        tiny_config(tmp_path, data={"batch_size": 4, "grad_accum": 2}, run={"out_dir": str(tmp_path / "b")}),
        log=quiet,
    )
    s_big, s_acc = big.train_step(), acc.train_step()
    assert s_acc.tokens == s_big.tokens == 8 * 32
    assert s_acc.loss == pytest.approx(s_big.loss, rel=1e-6)
    assert s_acc.grad_norm == pytest.approx(s_big.grad_norm, rel=1e-4)
    for name in big.params:
        np.testing.assert_allclose(acc.params[name], big.params[name], rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------- kill and resume


def test_sigkill_and_resume_continues_the_loss_curve_exactly(tmp_path):
    cfg = tiny_config(tmp_path)
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    ref = run_child(["train", "--config", str(config_file), "--out-dir", str(ref_dir)], tmp_path / "unused")
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out

    # the second run freezes while writing its step-30 checkpoint; it is killed there
    marker = tmp_path / "frozen"
    victim = run_child(
        ["train", "--config", str(config_file)], marker, block=checkpoint_path(run_dir, 30).name
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the training run never reached its step-30 checkpoint"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(run_dir)] == [10, 20]  # keep_last = 2; 30 was never renamed
    assert list(run_dir.glob(".ckpt-00000030.tck.tmp-*"))  # the half-done save it left behind
    assert max(read_metrics(run_dir)) == 30

    again = CliRunner().invoke(cli_main, ["train", "--config", str(config_file)])
    assert again.exit_code == 1 and "--resume" in again.output  # never silently restarts over a run

    resumed = run_child(["train", "--config", str(config_file), "--resume"], tmp_path / "unused")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "ckpt-00000020" in out
    want, got = read_metrics(ref_dir), read_metrics(run_dir)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        for key in ("loss", "grad_norm", "lr", "entropy"):
            assert got[step][key] == want[step][key], (
                f"step {step} {key}: {got[step][key]} != {want[step][key]}"
            )
    assert not list(run_dir.glob(".ckpt-*.tmp-*"))  # the stale temp file was cleaned up
    assert [s for s, _ in list_checkpoints(run_dir)] == [30, 40]


def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    cfg = tiny_config(tmp_path, schedule={"steps": 20})
    Trainer(cfg, log=quiet).fit()
    want = read_metrics(tmp_path / "run")
    newest = checkpoint_path(tmp_path / "run", 20)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    messages = []
    trainer = Trainer(cfg, log=messages.append)
    assert trainer.resume() == checkpoint_path(tmp_path / "run", 10)
    assert any("skipping checkpoint at step 20" in m and "checksum mismatch" in m for m in messages)
    assert trainer.step == 10 and max(read_metrics(tmp_path / "run")) == 10
    trainer.fit()
    got = read_metrics(tmp_path / "run")
    assert [got[s]["loss"] for s in range(1, 21)] == [want[s]["loss"] for s in range(1, 21)]


# ------------------------------------------------------------------------------------- warnings, errors


def test_health_warnings(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), log=quiet)
    healthy = StepStats(1, 2.0, 2.0, 2.5, 0.0, 1.0, 1e-3, 30.0, 128)
    assert trainer.health_warnings(healthy) == []
    collapsed = StepStats(1, 0.4, 0.4, 0.05, 0.0, 1.0, 1e-3, 30.0, 128)
    (w,) = trainer.health_warnings(collapsed)
    assert "entropy 0.050 nats" in w and "entropy_weight" in w
    exploding = StepStats(1, 2.0, 2.0, 2.5, 0.0, 1.0, 1e-3, 5e4, 128)
    (w,) = trainer.health_warnings(exploding)
    assert "max |logit| 5e+04" in w and "logit_softcap" in w
    messages = []
    Trainer(tiny_config(tmp_path, run={"log_every": 1, "entropy_warn": 100.0}), log=messages.append).fit(2)
    assert sum(m.startswith("warning: step") for m in messages) == 2
    assert messages[0].startswith("step      1/2 | loss ") and "tok/s" in messages[0]


def test_non_finite_loss_stops_training(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), log=quiet)
    trainer.params["blk.0.ffn_norm.weight"][0] = np.nan
    with pytest.raises(TrainingError, match="step 1: loss is nan"):
        trainer.train_step()


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"\[model\]: unknown key\(s\) \['n_embed'\]"):
        TrainConfig.from_dict({"model": {"n_embed": 64}})
    with pytest.raises(ConfigError, match="model.n_layer: expected int"):
        TrainConfig.from_dict({"model": {"n_layer": "four"}})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_preset("nope")
    with pytest.raises(TrainingError, match="model.n_vocab 300 != the data's vocabulary 258"):
        Trainer(tiny_config(tmp_path, model={"n_vocab": 300}), log=quiet)
    with pytest.raises(TrainingError, match="no such file"):
        Trainer(tiny_config(tmp_path, data={"path": str(tmp_path / "missing")}), log=quiet)
    result = CliRunner().invoke(cli_main, ["train"])
    assert result.exit_code != 0 and "--config FILE or --preset NAME" in result.output
    assert {"tiny-bytes", "small-code", "bitnet-125m"} <= set(preset_names())


def test_byte_windows_cover_each_window_once_per_epoch_and_resume():
    tokens = np.arange(1000)
    loader = ByteWindows(tokens, batch_size=3, seq_len=10, seed=4)
    assert loader.n_windows == 99 and loader.batches_per_epoch == 33
    first_epoch = np.concatenate([next(loader) for _ in range(33)])
    assert sorted(first_epoch[:, 0]) == list(range(0, 990, 10))  # every window exactly once
    np.testing.assert_array_equal(first_epoch[:, 1:], first_epoch[:, :1] + np.arange(1, 11))
    state = loader.state_dict()
    want = next(loader)
    fresh = ByteWindows(tokens, batch_size=3, seq_len=10, seed=4)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(next(fresh), want)
    with pytest.raises(TrainingError, match="seq_len"):
        ByteWindows(tokens, batch_size=3, seq_len=12, seed=4).load_state_dict(state)
