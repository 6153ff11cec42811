"""Continuous batching over the engine's slot API: one thread, one `eval_batch` call per step.

Each admitted request owns one KV-cache slot. A step puts one decode token of every generating request and
prompt chunks of newly admitted ones (up to `batch_size` tokens in all) into a single `Engine.eval_batch`
call, then samples the next token of every request whose logits came back. Requests arrive and leave between
steps, so a long prompt never stalls the others for more than one chunk, and a cancelled request (client gone)
frees its slot at the next step. When every slot is busy and the wait queue is full, `submit` refuses at once
(503) instead of stalling. Results go back through each job's `emit` callback (the HTTP side posts them into
its event loop)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from ternary.server.errors import APIError
from ternary.server.text_stream import TextStream

log = logging.getLogger(__name__)


class SlotEngine(Protocol):
    """The part of `ternary.engine.engine.Engine` the scheduler drives."""

    n_slots: int
    n_ctx: int

    def reset_slot(self, slot: int) -> None: ...

    def eval_batch(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        logits_for: np.ndarray | None = None,
    ) -> np.ndarray: ...


class TokenSampler(Protocol):
    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int: ...


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability under the model and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    text_offset: int  # characters of completion text before this token's text


@dataclass(frozen=True)
class Delta:
    """New completion text (maybe empty) and, when asked for, the logprobs of the tokens behind it."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end-of-generation token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    prompt_ms: float
    predicted_ms: float


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One generation request: its prompt, limits, sampler and where its events go."""

    prompt: list[int]
    max_new: int
    sampler: TokenSampler
    text: TextStream
    emit: Callable[[Event], None]
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    # state owned by the scheduler thread
    slot: int = -1
    n_past: int = 0
    pending: int | None = None  # sampled, not yet evaluated token
    generated: int = 0
    chars: int = 0
    history: list[int] = field(default_factory=list)
    cancelled: bool = False
    t_admit: float = 0.0
    t_first: float = 0.0


class StepObserver(Protocol):
    def on_step(self, n_tokens: int, seconds: float) -> None: ...

    def on_finished(self, finished: Finished) -> None: ...


class Scheduler:
    """Owns the engine after loading: only this thread calls `reset_slot` and `eval_batch`."""

    def __init__(
        self,
        engine: SlotEngine,
        eog_ids: frozenset[int],
        *,
        batch_size: int = 256,
        max_waiting: int = 64,
        observer: StepObserver | None = None,
        thread_setup: Callable[[], object] | None = None,
    ) -> None:
        self.engine = engine
        self.n_slots = int(engine.n_slots)
        self.eog_ids = eog_ids
        self.batch_size = max(batch_size, self.n_slots)
        self.max_waiting = max_waiting
        self.observer = observer
        self.thread_setup = thread_setup  # runs first on the scheduler thread (per-thread library settings)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ternary-scheduler", daemon=True)

    # ---- HTTP side (event-loop thread) ----
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def n_active(self) -> int:
        return len(self._active)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 503 when every slot is busy and the queue is full."""
        with self._cond:
            if self._stopping:
                raise APIError(
                    503, "The server is shutting down.", type="unavailable_error", code="shutting_down"
                )
            if len(self._active) + len(self._waiting) >= self.n_slots + self.max_waiting:
                raise APIError(
                    503,
                    f"The server is busy: all {self.n_slots} slots are generating and the wait queue "
                    f"({self.max_waiting}) is full. Retry shortly.",
                    type="unavailable_error",
                    code="server_busy",
                    headers={"Retry-After": "1"},
                )
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (its client left); its slot is freed before the next step."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    # ---- scheduler thread ----
    def _run(self) -> None:
        if self.thread_setup is not None:
            self.thread_setup()
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                for job in [j for j in self._active if j.cancelled]:
                    self._release(job)
                    if self.observer is not None:
                        self.observer.on_finished(self._summary(job, "cancelled"))
                self._admit()
                batch = self._plan()
            if batch is not None:
                self._step(*batch)

    def _admit(self) -> None:
        while self._free and self._waiting:
            job = self._waiting.popleft()
            job.slot = self._free.pop()
            job.t_admit = time.perf_counter()
            job.history = list(job.prompt)
            self._active.append(job)

    def _release(self, job: Job) -> None:
        self._active.remove(job)
        self._free.append(job.slot)

    def _plan(self) -> tuple[list[Job], list[Job], np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """This step's rows: one decode token per generating job, then prompt chunks while budget lasts."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        want: list[bool] = []
        sampled: list[Job] = []
        advanced: list[Job] = []
        for job in self._active:
            if job.pending is not None:
                tokens.append(job.pending)
                positions.append(job.n_past)
                slots.append(job.slot)
                want.append(True)
                sampled.append(job)
                advanced.append(job)
        budget = self.batch_size - len(tokens)
        for job in self._active:
            if job.pending is not None or budget <= 0:
                continue
            if job.n_past == 0:
                self.engine.reset_slot(job.slot)
            n = min(len(job.prompt) - job.n_past, budget)
            budget -= n
            tokens.extend(job.prompt[job.n_past : job.n_past + n])
            positions.extend(range(job.n_past, job.n_past + n))
            slots.extend([job.slot] * n)
            done = job.n_past + n == len(job.prompt)
            want.extend([False] * (n - 1) + [done])
            advanced.append(job)
            if done:
                sampled.append(job)
        if not tokens:
            return None
        return (
            sampled,
            advanced,
            np.asarray(tokens, dtype=np.int32),
            np.asarray(positions, dtype=np.int32),
            np.asarray(slots, dtype=np.int32),
            np.asarray(want, dtype=np.bool_),
        )

    def _step(
        self,
        sampled: list[Job],
        advanced: list[Job],
        tokens: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        want: np.ndarray,
    ) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.engine.eval_batch(tokens, positions, slots, want)
        except Exception as e:  # the worker must survive: fail this batch's jobs, keep serving
            log.exception("eval_batch failed")
            err = APIError(
                500, f"The engine failed on this request: {e}", type="server_error", code="engine_error"
            )
            for job in advanced:
                self._finish(job, Failed(err))
            return
        if self.observer is not None:
            self.observer.on_step(len(tokens), time.perf_counter() - t0)
        for job in advanced:
            job.n_past += 1 if job.pending is not None else int(np.count_nonzero(slots == job.slot))
        for job, row in zip(sampled, logits, strict=True):
            if job.cancelled:
                continue
            try:
                self._next_token(job, row)
            except Exception as e:
                log.exception("sampling failed")
                self._finish(job, Failed(APIError(500, f"Sampling failed: {e}", type="server_error")))

    def _next_token(self, job: Job, row: np.ndarray) -> None:
        now = time.perf_counter()
        if job.generated == 0:
            job.t_first = now
        logits = row
        if job.logit_bias:
            logits = row.copy()
            for token, bias in job.logit_bias.items():
                logits[token] += bias
        token = int(job.sampler.sample(logits, job.history))
        job.generated += 1
        job.history.append(token)
        job.pending = token
        if token in self.eog_ids:
            self._finish(job, None, "stop", tail=job.text.flush())
            return
        text = job.text.push(token)
        info = (self._logprob(job, row, token),) if job.logprobs else ()
        job.chars += len(text)
        if job.text.stopped:
            self._finish(job, Delta(text, info), "stop")
        elif job.generated >= job.max_new:
            self._finish(job, Delta(text + job.text.flush(), info), "length")
        elif text or info:
            self._send(job, Delta(text, info))

    def _logprob(self, job: Job, row: np.ndarray, token: int) -> TokenLogprob:
        """Log-probabilities under the model itself (before temperature, penalties, bias), as OpenAI."""
        x = row.astype(np.float64)
        m = x.max()
        lse = m + np.log(np.exp(x - m).sum())
        top: tuple[tuple[int, float], ...] = ()
        if job.top_logprobs:
            k = min(job.top_logprobs, x.size)
            idx = np.argpartition(-x, k - 1)[:k]
            idx = idx[np.lexsort((idx, -x[idx]))]
            top = tuple((int(i), float(x[i] - lse)) for i in idx)
        return TokenLogprob(token, float(x[token] - lse), top, job.chars)

    def _finish(self, job: Job, event: Event | None, reason: str = "", tail: str = "") -> None:
        with self._cond:
            if job in self._active:
                self._release(job)
        if tail:
            self._send(job, Delta(tail))
        if event is not None and not (isinstance(event, Delta) and not event.text and not event.logprobs):
            self._send(job, event)
        if reason:
            finished = self._summary(job, reason)
            if self.observer is not None:
                self.observer.on_finished(finished)
            self._send(job, finished)

    def _summary(self, job: Job, reason: str) -> Finished:
        now = time.perf_counter()
        first = job.t_first if job.generated else now
        return Finished(
            reason=reason,
            prompt_tokens=len(job.prompt),
            completion_tokens=job.generated,
            prompt_ms=(first - job.t_admit) * 1e3,
            predicted_ms=(now - first) * 1e3,
        )

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # the client's event loop is gone: nobody is listening any more
            job.cancelled = True
