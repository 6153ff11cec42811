"""The backend boundary: the NumPy module implements the whole op set, `load` reports a missing or
incomplete backend by name, and a second backend module plugs into the trainer unchanged."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from ternary.training import backend
from ternary.training.backend import OPS, BackendError, load
from ternary.training.config import TrainConfig
from ternary.training.trainer import Trainer


def test_numpy_backend_implements_every_op():
    assert load("cpu") is backend
    assert all(callable(getattr(backend, name)) for name in OPS)


def test_unknown_device_is_named():
    with pytest.raises(BackendError, match="unknown device 'tpu'.*cpu, cuda"):
        load("tpu")


def test_incomplete_backend_lists_missing_ops(monkeypatch):
    stub = types.ModuleType("ternary.training.cuda_ops")
    stub.matmul = backend.matmul
    monkeypatch.setitem(sys.modules, "ternary.training.cuda_ops", stub)
    with pytest.raises(BackendError, match="lacks ops: asarray, to_host"):
        load("cuda")


def recording_backend(calls: dict[str, int]) -> types.ModuleType:
    """A second backend module: every op forwards to NumPy's and counts its calls."""
    mod = types.ModuleType("ternary.training.cuda_ops")

    def wrap(name):
        fn = getattr(backend, name)

        def op(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return op

    for name in OPS:
        setattr(mod, name, wrap(name))
    return mod


def test_a_second_backend_plugs_into_the_trainer(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_bytes(Path(__file__).read_bytes()[:3000])
    cfg = TrainConfig.from_dict({
        "model": {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_ff": 32, "n_ctx_train": 16},
        "optim": {"name": "muon", "aux_optimizer": "lion"},
        "schedule": {"steps": 3, "warmup_steps": 1},
        "data": {"path": str(tmp_path / "t.txt"), "seq_len": 16, "batch_size": 2},
        "run": {"out_dir": str(tmp_path / "run"), "ckpt_every": 100, "log_every": 100, "entropy_weight": 0.1},
    })  # fmt: skip
    calls: dict[str, int] = {}
    monkeypatch.setitem(sys.modules, "ternary.training.cuda_ops", recording_backend(calls))
    on_cpu = Trainer(cfg, device="cpu", log=lambda m: None).fit()
    on_other = Trainer(
        cfg.replace({"run.out_dir": str(tmp_path / "b")}), device="cuda", log=lambda m: None
    ).fit()
    assert [s.loss for s in on_other] == [s.loss for s in on_cpu]
    # not in this configuration; newton_schulz5 is called inside NumPy's muon_, not through the module
    unused = {"adamw_", "kl_to_teacher", "softcap", "softcap_backward", "newton_schulz5"}
    assert set(OPS) - set(calls) <= unused, sorted(set(OPS) - set(calls) - unused)
    assert calls["muon_"] == 3 * 7 and calls["lion_"] == 3 * 6  # 7 BitLinear weights; embedding + 5 norms
