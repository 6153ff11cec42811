"""The continuous-batching scheduler against a reference engine whose logits are a pure function of a slot's
token prefix: any mix-up of slots, positions, prompt chunks or logits rows changes the generated tokens,
which are checked against plain sequential greedy decoding of the same function."""

from __future__ import annotations

import codecs
import threading
import zlib

import numpy as np
import pytest
from ternary.engine.sampling import Sampler, SamplingParams
from ternary.server.errors import APIError
from ternary.server.scheduler import Delta, Failed, Finished, Job, Scheduler
from ternary.server.text_stream import TextStream

N_VOCAB = 300
EOG = 299
PRINTABLE = np.zeros(N_VOCAB, dtype=bool)
PRINTABLE[32:127] = True


def reference_logits(prefix: list[int]) -> np.ndarray:
    """Deterministic logits for the next token after `prefix`; only printable ASCII bytes are likely."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(prefix, dtype=np.int32).tobytes()))
    logits = rng.standard_normal(N_VOCAB).astype(np.float32)
    logits[~PRINTABLE] -= 20.0
    return logits


def reference_greedy(prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        token = int(np.argmax(reference_logits(seq)))
        out.append(token)
        seq.append(token)
    return out


class PrefixEngine:
    """The slot API over per-slot token lists; refuses holes like the real KV cache does."""

    def __init__(self, n_slots: int, n_ctx: int) -> None:
        self.n_slots, self.n_ctx = n_slots, n_ctx
        self.seqs: list[list[int]] = [[] for _ in range(n_slots)]
        self.batches: list[tuple[int, int]] = []  # (tokens, distinct slots) per call
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def reset_slot(self, slot: int) -> None:
        self.seqs[slot] = []

    def eval_batch(self, tokens, positions, slots, logits_for=None):
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated kernel failure")
        assert tokens.dtype == np.int32 and positions.dtype == np.int32 and slots.dtype == np.int32
        rows = []
        for i, (t, p, s) in enumerate(zip(tokens.tolist(), positions.tolist(), slots.tolist(), strict=True)):
            seq = self.seqs[s]
            assert p <= len(seq) < self.n_ctx + 1 and p < self.n_ctx, (
                f"slot {s}: position {p}, length {len(seq)}"
            )
            del seq[p:]
            seq.append(t)
            if logits_for is None or logits_for[i]:
                rows.append(reference_logits(seq))
        self.batches.append((len(tokens), len(set(slots.tolist()))))
        return np.array(rows, dtype=np.float32).reshape(len(rows), N_VOCAB)


class ByteDecoder:
    """Token ids < 256 are bytes; the rest (specials) have no text."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(bytes([token]) if token < 256 else b"")

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Collector:
    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def emit(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def final(self):
        assert self.done.wait(20), "the job never finished"
        return self.events[-1]


def make_job(prompt, max_new, stop=(), **kw) -> tuple[Job, Collector]:
    sink = Collector()
    job = Job(
        prompt=list(prompt),
        max_new=max_new,
        sampler=Sampler(SamplingParams(temperature=0.0)),
        text=TextStream(ByteDecoder(), stop),
        emit=sink.emit,
        **kw,
    )
    return job, sink


@pytest.fixture
def run_scheduler():
    started = []

    def start(engine, **kw) -> Scheduler:
        s = Scheduler(engine, frozenset({EOG}), **kw)
        s.start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_batched_generation_equals_sequential_greedy(run_scheduler):
    engine = PrefixEngine(n_slots=3, n_ctx=64)
    sched = run_scheduler(engine, batch_size=8, max_waiting=16)
    prompts = [[65 + i] * (3 + 5 * i) for i in range(7)]  # 3..33 tokens: several need more than one chunk
    jobs = [make_job(p, max_new=10) for p in prompts]
    for job, _ in jobs:
        sched.submit(job)
    for (job, sink), prompt in zip(jobs, prompts, strict=True):
        final = sink.final
        assert isinstance(final, Finished) and final.reason == "length"
        assert final.prompt_tokens == len(prompt) and final.completion_tokens == 10
        expected = reference_greedy(prompt, 10)
        assert job.history[len(prompt) :] == expected
        assert sink.text == bytes(expected).decode()
    assert max(n for n, _ in engine.batches) <= 8
    # continuous batching: some steps carried several slots at once, some mixed a prompt chunk with decodes
    assert any(slots > 1 for _, slots in engine.batches)
    assert any(n > slots > 1 for n, slots in engine.batches)
    assert sched.n_active == 0 and sched.n_waiting == 0


def test_generation_stops_at_the_context_end(run_scheduler):
    engine = PrefixEngine(n_slots=1, n_ctx=12)
    sched = run_scheduler(engine)
    job, sink = make_job([70] * 9, max_new=12 - 9)
    sched.submit(job)
    assert sink.final.reason == "length" and sink.final.completion_tokens == 3
    assert job.history[9:] == reference_greedy([70] * 9, 3)


def test_stop_string_cuts_text_and_frees_the_slot(run_scheduler):
    prompt = [66] * 5
    reference = bytes(reference_greedy(prompt, 20)).decode()
    stop = reference[6:8]
    engine = PrefixEngine(n_slots=1, n_ctx=64)
    sched = run_scheduler(engine)
    job, sink = make_job(prompt, max_new=20, stop=[stop])
    sched.submit(job)
    assert sink.final.reason == "stop"
    assert sink.text == reference[: reference.index(stop)]
    assert sink.final.completion_tokens == reference.index(stop) + len(stop)
    follow, follow_sink = make_job(prompt, max_new=4)
    sched.submit(follow)
    assert follow_sink.final.reason == "length"


def test_end_of_generation_token_stops_without_text(run_scheduler):
    sched = run_scheduler(PrefixEngine(n_slots=1, n_ctx=64))
    job, sink = make_job([67] * 4, max_new=10, logit_bias={EOG: 100.0})
    sched.submit(job)
    assert sink.final.reason == "stop" and sink.final.completion_tokens == 1
    assert sink.text == ""


def test_full_queue_is_refused_at_once_and_queued_jobs_still_finish(run_scheduler):
    engine = PrefixEngine(n_slots=1, n_ctx=64)
    engine.gate.clear()  # hold the engine so the slot stays busy
    sched = run_scheduler(engine, max_waiting=1)
    first, first_sink = make_job([68] * 3, max_new=3)
    second, second_sink = make_job([69] * 3, max_new=3)
    sched.submit(first)
    sched.submit(second)
    third, _ = make_job([70] * 3, max_new=3)
    with pytest.raises(APIError) as refused:
        sched.submit(third)
    assert refused.value.status == 503 and refused.value.code == "server_busy"
    engine.gate.set()
    assert first_sink.final.reason == "length" and second_sink.final.reason == "length"
    assert second.history[3:] == reference_greedy([69] * 3, 3)


def test_cancelled_job_frees_its_slot_for_the_next(run_scheduler):
    engine = PrefixEngine(n_slots=1, n_ctx=4096)
    sched = run_scheduler(engine, max_waiting=4)
    long_job, long_sink = make_job([71] * 3, max_new=4000)
    sched.submit(long_job)
    waiter, waiter_sink = make_job([72] * 3, max_new=2)
    sched.submit(waiter)
    sched.cancel(long_job)
    assert waiter_sink.final.reason == "length"
    assert waiter.history[3:] == reference_greedy([72] * 3, 2)
    assert not any(isinstance(e, Finished) for e in long_sink.events)
    assert long_job.generated < 4000


def test_engine_failure_fails_that_batch_and_the_worker_keeps_serving(run_scheduler):
    engine = PrefixEngine(n_slots=2, n_ctx=64)
    engine.fail_next = True
    sched = run_scheduler(engine)
    broken, broken_sink = make_job([73] * 3, max_new=3)
    sched.submit(broken)
    assert isinstance(broken_sink.final, Failed) and broken_sink.final.error.status == 500
    ok, ok_sink = make_job([74] * 3, max_new=3)
    sched.submit(ok)
    assert ok_sink.final.reason == "length"
    assert ok.history[3:] == reference_greedy([74] * 3, 3)


def test_thread_setup_runs_on_the_scheduler_thread(run_scheduler):
    # numba.set_num_threads is per thread: the engine's thread count must be applied where eval_batch runs
    seen = []
    engine = PrefixEngine(n_slots=1, n_ctx=16)
    sched = run_scheduler(engine, thread_setup=lambda: seen.append(threading.get_ident()))
    job, sink = make_job([76] * 2, max_new=1)
    sched.submit(job)
    assert sink.final.reason == "length"
    assert seen == [sched._thread.ident] and seen[0] != threading.get_ident()


def test_logprobs_are_the_model_log_softmax(run_scheduler):
    sched = run_scheduler(PrefixEngine(n_slots=1, n_ctx=64))
    prompt = [75] * 4
    job, sink = make_job(prompt, max_new=3, logprobs=True, top_logprobs=4)
    sched.submit(job)
    assert sink.final.reason == "length"
    entries = [lp for e in sink.events if isinstance(e, Delta) for lp in e.logprobs]
    seq = list(prompt)
    for entry, token in zip(entries, reference_greedy(prompt, 3), strict=True):
        x = reference_logits(seq).astype(np.float64)
        logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        best = np.argsort(-logp, kind="stable")[:4]
        assert entry.token == token == best[0]
        assert entry.logprob == pytest.approx(logp[token], abs=1e-9)
        assert [t for t, _ in entry.top] == best.tolist()
        assert [v for _, v in entry.top] == pytest.approx(logp[best].tolist(), abs=1e-9)
        seq.append(token)
