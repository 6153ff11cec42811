"""``Engine``: a model file opened for inference, with text in and text out.

    with Engine("model.gguf") as llm:
        print(llm.generate("def fib(n):", max_tokens=32, temperature=0, stream=False))

It owns the tokenizer, the forward pass (``model.Transformer``) and its slot KV cache. ``generate`` runs one
sequence in slot 0; the server's continuous batching drives ``eval_batch`` / ``reset_slot`` directly.

Threads: ``numba.set_num_threads`` is a setting of the calling thread, so every ``eval_batch`` applies the
engine's count itself (the server calls from its scheduler thread, a benchmark from the main thread).
``decode_threads`` may differ for batches of single decode tokens: on a loaded machine one thread avoids a
parallel region stalling for a whole scheduler slice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import numba
import numpy as np
import psutil
from ternary.engine.load import CacheSetting
from ternary.engine.model import load_transformer
from ternary.engine.numa import NumaSetting, bind_threads, resolve_plan
from ternary.engine.sampling import DRY_DEFAULT_BREAKERS, DryParams, Sampler, SamplingParams
from ternary.formats.model_file import open_model
from ternary.formats.tokenizer import StreamDecoder, Tokenizer

PROMPT_CHUNK = 512  # tokens per prompt batch: bounds the activations of a long prompt


def default_threads() -> int:
    """Physical cores (what llama.cpp users set by hand), within what Numba was started with."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, min(cores, numba.config.NUMBA_NUM_THREADS))


def thread_count(threads: int | None, what: str = "threads") -> int:
    """``threads`` checked and capped at Numba's ceiling (None: physical cores)."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"{what} must be at least 1, got {threads}")
    return min(n, numba.config.NUMBA_NUM_THREADS)  # numba's ceiling, fixed when it was imported


def set_threads(threads: int | None) -> int:
    """Apply ``threads`` (None: physical cores) to Numba's parallel kernels on the calling thread; returns
    the number in use."""
    n = thread_count(threads)
    numba.set_num_threads(n)
    return n


@dataclass
class GenerationStats:
    """Timings of the last ``generate`` (and of loading), as llama.cpp reports them."""

    load_seconds: float = 0.0
    jit_seconds: float = 0.0  # loading (or compiling) the Numba kernels, apart from the timings below
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class _StopFilter:
    """Holds back text that may be the start of a stop string; reports when one is complete."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is safe to emit now (everything before a complete stop string, which ends the run)."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.buffer)), keep, -1):
                if self.buffer.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.buffer) - keep
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class Engine:
    """A BitNet GGUF loaded for inference (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        n_ctx: int | None = None,
        act_quant: str = "q8k",
        ffn_act: str | None = None,
        n_slots: int = 1,
        layout: str = "planar",
        decode_threads: int | None = None,
        kernel_path: str | None = None,
        repack_cache: CacheSetting = None,
        numa: NumaSetting = None,
    ) -> None:
        """``path``: a GGUF file (None: the bundled model, ``ternary.models.default_model_path()``);
        ``layout``: ``planar`` (fast, fused) or ``reference``; ``decode_threads``: threads for batches of
        single decode tokens (None: ``threads``); ``kernel_path``: force a kernel path (``cpu_features``);
        ``repack_cache``: folder of repacked weights (None: the default, False: none); ``numa``: on a machine
        with several memory nodes, ``"distribute"`` (the default; None reads ``$TERNARY_NUMA``) puts each
        node's share of the weights in its memory and pins the threads that read it there; ``"off"``: not."""
        start = time.perf_counter()
        self.threads = set_threads(threads)
        self.numa_plan = resolve_plan(numa, self.threads)
        self._bound_teams: set[tuple[int, int]] = set()
        self.decode_threads = (
            thread_count(decode_threads, "decode_threads") if decode_threads else self.threads
        )
        if n_ctx is not None and n_ctx < 0:
            raise ValueError(f"n_ctx must be positive (0 or None: the model's), got {n_ctx}")
        if n_slots < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        if path is None:
            from ternary.models import default_model_path

            path = default_model_path()
        with open_model(path, ffn_act=ffn_act) as mf:
            self.path = mf.path
            self.config = mf.config
            self.tokenizer = Tokenizer.from_metadata(mf.gguf.metadata, source=mf.path)
            self.model = load_transformer(
                mf,
                n_slots=n_slots,
                n_ctx=n_ctx or None,
                act_quant=act_quant,
                layout=layout,
                kernel_path=kernel_path,
                repack_cache=repack_cache,
                numa=self.numa_plan or False,
            )
        loaded = time.perf_counter()
        self._warm_up()
        self.stats = GenerationStats(load_seconds=loaded - start, jit_seconds=time.perf_counter() - loaded)

    def _warm_up(self) -> None:
        """Run a two-token batch and a one-token step through slot 0 so the kernels are ready now."""
        if self.n_ctx >= 3:
            self.eval_batch([0, 0], [0, 1], [0, 0])
            self.eval_batch([0], [2], [0])
        self.reset_slot(0)

    def set_threads(self, threads: int | None, decode_threads: int | None = None) -> None:
        """Thread counts for the next ``eval_batch`` calls (``decode_threads`` None: as ``threads``)."""
        self.threads = thread_count(threads)
        self.decode_threads = (
            thread_count(decode_threads, "decode_threads") if decode_threads else self.threads
        )

    # ------------------------------------------------------------------ slot API (continuous batching)

    @property
    def n_slots(self) -> int:
        return self.model.n_slots

    @property
    def n_ctx(self) -> int:
        """Context length of each slot."""
        return self.model.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.model.head.n_out

    @property
    def layout(self) -> str:
        return self.model.layout

    def reset_slot(self, slot: int) -> None:
        self.model.reset_slot(slot)

    def eval_batch(
        self,
        tokens: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        logits_for: Sequence[bool] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Evaluate (token, position, slot) triples; logits float32[n_true, n_vocab] where ``logits_for``."""
        decode = len(tokens) == len(set(np.asarray(slots).tolist()))  # one token per slot
        n_threads = self.decode_threads if decode else self.threads
        numba.set_num_threads(n_threads)
        if self.numa_plan is not None:
            self._bind_team(n_threads)
        return self.model.forward(tokens, positions, slots, logits_for)

    def _bind_team(self, n_threads: int) -> None:
        """Pin this Python thread's Numba team of ``n_threads`` to the nodes holding its rows, once (each
        calling thread has its own team; affinity belongs to OS threads)."""
        key = (threading.get_ident(), n_threads)
        if key not in self._bound_teams:
            bind_threads(self.numa_plan)
            self._bound_teams.add(key)

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_bos`` and the model's vocabulary asks for one."""
        return self.tokenizer.encode(text, add_bos=add_bos and self.tokenizer.add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ whole sequences

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.n_ctx} tokens")
        return ids

    def _prefill(self, ids: list[int], slot: int, all_logits: bool) -> np.ndarray:
        """Evaluate ``ids`` at positions 0.. of a fresh ``slot``, in chunks; all or only the last logits."""
        self.reset_slot(slot)
        rows = []
        for start in range(0, len(ids), PROMPT_CHUNK):
            chunk = ids[start : start + PROMPT_CHUNK]
            n = len(chunk)
            want = np.ones(n, dtype=bool) if all_logits else np.arange(n) == n - 1
            if not all_logits and start + n < len(ids):
                want[:] = False
            rows.append(self.eval_batch(chunk, np.arange(start, start + n), np.full(n, slot), want))
        return np.concatenate(rows)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32[len(ids), n_vocab]: logits after every prefix of ``ids`` in a fresh context (slot 0)."""
        return self._prefill(self._check_ids(ids), 0, all_logits=True)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_penalty_last_n: int = -1,
        dry_sequence_breakers: Sequence[str] = DRY_DEFAULT_BREAKERS,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        stream: bool = True,
        ignore_eos: bool = False,
    ) -> Iterator[str] | str:
        """Continue ``prompt`` (text, or token ids used as given).

        Sampling follows llama.cpp (``ternary.engine.sampling``); ``dry_*`` is its DRY sampler (off while
        ``dry_multiplier`` is 0), the prompt counting as history as it does there.
        Stops after ``max_tokens`` (None or -1: until an end-of-generation token or a full context), at an
        end-of-generation id (unless ``ignore_eos``), or at a stop string, which is not emitted.
        ``stream=True`` returns an iterator of text pieces (complete UTF-8 only), ``stream=False`` the text.
        Timings land in ``self.stats``.
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        ids = self._check_ids(ids)
        breakers = dry_sequence_breakers  # DryParams makes a tuple of a list and refuses a bare string
        dry = DryParams(dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n, breakers)
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, dry)
        stops = [stop] if isinstance(stop, str) else list(stop)
        limit = None if max_tokens is None or max_tokens < 0 else int(max_tokens)
        pieces = self._generate(ids, Sampler(params, self.tokenizer), stops, limit, ignore_eos)
        return pieces if stream else "".join(pieces)

    def _generate(
        self, ids: list[int], sampler: Sampler, stops: list[str], limit: int | None, ignore_eos: bool
    ) -> Iterator[str]:
        stats = self.stats
        stats.prompt_tokens, stats.generated_tokens = len(ids), 0
        stats.prompt_seconds = stats.generation_seconds = 0.0
        start = time.perf_counter()
        logits = self._prefill(ids, 0, all_logits=False)[-1]
        stats.prompt_seconds = time.perf_counter() - start

        decoder = StreamDecoder(self.tokenizer, special=False, strip_leading_space=False)
        stop_filter = _StopFilter(stops)
        history = list(ids)
        start = time.perf_counter()
        try:
            while limit is None or stats.generated_tokens < limit:
                token = sampler.sample(logits, history)
                if token in self.tokenizer.eog_ids and not ignore_eos:
                    break
                history.append(token)
                stats.generated_tokens += 1
                text = stop_filter.push(decoder.feed(token))
                if text:
                    yield text
                if stop_filter.stopped or len(history) >= self.n_ctx:
                    break
                if limit is not None and stats.generated_tokens >= limit:
                    break
                logits = self.eval_batch([token], [len(history) - 1], [0])[0]
            if not stop_filter.stopped:
                tail = stop_filter.push(decoder.flush())
                tail += "" if stop_filter.stopped else stop_filter.flush()
                if tail:
                    yield tail
        finally:
            stats.generation_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """The head reads the model file's memory map (and the weights that of the repack cache) until the
        engine is garbage-collected; kept so ``with Engine(...)`` reads naturally."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
