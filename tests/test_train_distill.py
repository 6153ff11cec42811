"""Distillation teachers (a local engine-like object, an OpenAI-compatible server on loopback) and a
distillation run whose KL to the teacher falls."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from ternary.training.config import TrainConfig
from ternary.training.distill import (
    EngineTeacher,
    ServerTeacher,
    TeacherError,
    distribution_from_logits,
    token_text_table,
)
from ternary.training.trainer import Trainer, byte_tokenizer_metadata

V = 258  # the byte-level vocabulary


def teacher_logits(seq):
    """A deterministic teacher: after byte b it strongly expects b+1, mildly b+2."""
    out = np.full((len(seq), V), -4.0)
    for t, b in enumerate(seq):
        out[t, (b + 1) % V] = 3.0
        out[t, (b + 2) % V] = 1.0
    return out


class FakeEngine:
    def logits(self, ids):
        return teacher_logits(ids)


def test_distribution_from_logits_full_and_top_k():
    z = np.array([[2.0, 0.0, 1.0, -1.0]])
    ids, p = distribution_from_logits(z, 2.0, 0)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3]])
    np.testing.assert_allclose(p, np.exp(z / 2) / np.exp(z / 2).sum(), rtol=1e-6)
    ids, p = distribution_from_logits(z, 1.0, 2)
    assert sorted(ids[0]) == [0, 2]
    e = np.exp([2.0, 1.0])
    np.testing.assert_allclose(p[0][np.argsort(ids[0])], e / e.sum(), rtol=1e-6)


def test_engine_teacher_checks_vocabulary():
    ids, p = EngineTeacher(FakeEngine(), V).targets(np.array([[5, 6], [7, 8]]), 1.0, 2)
    assert ids.shape == (4, 2) and sorted(ids[0]) == [6, 7] and sorted(ids[3]) == [9, 10]
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    with pytest.raises(TeacherError, match="student's vocabulary"):
        EngineTeacher(FakeEngine(), 300).targets(np.array([[5, 6]]), 1.0, 0)


class CompletionsHandler(BaseHTTPRequestHandler):
    """/v1/completions with legacy logprobs from `teacher_logits`; refuses echo when the server says so."""

    refuse_echo = False
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        prompt, k = body["prompt"], body["logprobs"]
        if body.get("echo") and self.refuse_echo:
            return self._send(400, {"error": {"message": "echo is not supported", "type": "invalid_request"}})
        scored = prompt if body.get("echo") else prompt[-1:]
        tops = [None] if body.get("echo") else []
        for b in scored:
            z = teacher_logits([b])[0]
            lp = z - np.log(np.exp(z).sum())
            best = np.argsort(-lp)[:k]
            tops.append(
                {bytes([t]).decode("utf-8", "replace") if t < 256 else f"<{t}>": float(lp[t]) for t in best}
            )
        if body.get("echo"):
            tops = tops[: len(prompt)] + [tops[-1]]  # prompt positions, then the generated token's
        self._send(200, {"choices": [{"text": "", "logprobs": {"top_logprobs": tops}}]})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    CompletionsHandler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CompletionsHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    CompletionsHandler.refuse_echo = False


@pytest.mark.parametrize("refuse_echo", [False, True])
def test_server_teacher_matches_the_engine_teacher(server, refuse_echo):
    CompletionsHandler.refuse_echo = refuse_echo
    table = token_text_table(byte_tokenizer_metadata())
    assert table["a"] == ord("a") and "\ufffd" not in table  # bytes ≥ 0x80 all print as U+FFFD: dropped
    url = f"http://127.0.0.1:{server.server_address[1]}"
    teacher = ServerTeacher(url, table, top_k=2)
    batch = np.array([[ord("a"), ord("b"), ord("c")], [ord("x"), ord("y"), ord("0")]])
    ids, p = teacher.targets(batch, 1.0, 2)
    want_ids, want_p = EngineTeacher(FakeEngine(), V).targets(batch, 1.0, 2)
    order, want_order = np.argsort(ids, 1), np.argsort(want_ids, 1)
    np.testing.assert_array_equal(
        np.take_along_axis(ids, order, 1), np.take_along_axis(want_ids, want_order, 1)
    )
    np.testing.assert_allclose(
        np.take_along_axis(p, order, 1), np.take_along_axis(want_p, want_order, 1), rtol=1e-5
    )
    n_requests = len(CompletionsHandler.requests)
    assert n_requests == (1 + 6 if refuse_echo else 2)  # one refused echo, then one request per position


def test_server_teacher_reports_unreachable_server():
    teacher = ServerTeacher("http://127.0.0.1:9", {}, top_k=2, timeout=2)
    with pytest.raises(TeacherError, match="127.0.0.1:9"):
        teacher.targets(np.array([[1, 2]]), 1.0, 2)


def test_distillation_run_pulls_the_student_toward_the_teacher(tmp_path):
    text = bytes(range(32, 127)) * 12
    (tmp_path / "t.txt").write_bytes(text)
    cfg = TrainConfig.from_dict({
        "model": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_ff": 64, "n_ctx_train": 16},
        "optim": {"lr": 1e-2},
        "schedule": {"steps": 40, "warmup_steps": 2, "decay_frac": 0.0},
        "data": {"path": str(tmp_path / "t.txt"), "seq_len": 16, "batch_size": 4},
        "run": {"out_dir": str(tmp_path / "run"), "ckpt_every": 1000, "log_every": 1000},
        "distill": {"weight": 1.0, "temperature": 2.0, "top_k": 4},
    })  # fmt: skip
    trainer = Trainer(cfg, log=lambda m: None, teacher=EngineTeacher(FakeEngine(), V))
    history = trainer.fit()
    first, last = history[0].kl, np.mean([s.kl for s in history[-5:]])
    assert first > 1.0 and last < 0.5 * first, (first, last)
    assert history[-1].loss == pytest.approx(history[-1].ce + history[-1].kl)


def test_engine_teacher_from_a_gguf(oracle_dir):
    from ternary.training.config import DistillConfig
    from ternary.training.distill import make_teacher

    from ternary import Engine

    path = str(oracle_dir / "tiny-tq2_0-f16.gguf")
    teacher = make_teacher(DistillConfig(teacher=path, top_k=0), None, 2048)
    batch = np.array([[1, 17, 300, 5], [9, 8, 7, 6]])
    ids, p = teacher.targets(batch, 1.0, 0)
    assert ids.shape == p.shape == (8, 2048)
    z = np.asarray(Engine(path).logits([9, 8, 7, 6]), dtype=np.float64)
    want = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(p[4:], want / want.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)
    with pytest.raises(TeacherError, match="vocabulary 2048 != the student's 258"):
        make_teacher(DistillConfig(teacher=path), None, 258)
