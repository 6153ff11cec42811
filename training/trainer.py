"""The training loop: data → loss and gradients → clip → optimizer step → log, warn, checkpoint, resume.

    ternary-train train --preset tiny-bytes --set data.path=some/dir --set run.out_dir=runs/x

Data comes from a corpus folder built by `ternary.training.corpus` (token shards + index.json, with its
tokenizer JSON beside them), or, for quick runs without a tokenizer, from text files read as raw bytes
(`ByteWindows`: 256 byte tokens plus <|bos|>/<|eos|>). Both loaders yield `[B, T+1]` windows and expose
`state_dict()`/`load_state_dict()`, so a resumed run sees exactly the batches the uninterrupted one would.

A checkpoint holds the parameters, the optimizer state, the step, the trainer's RNG state, the data position,
the config and the tokenizer metadata (so `export` needs nothing else). Resuming from it reproduces the
uninterrupted run's losses bit for bit on the same machine, backend and BLAS thread count (OpenBLAS sums
in a different order with another number of threads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ternary.training import backend, checkpoint
from ternary.training.config import DataConfig, TrainConfig
from ternary.training.model import Transformer, init_params
from ternary.training.optim import Optimizer, clip_grad_norm_
from ternary.training.schedule import lr_multiplier

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".rs", ".go", ".java", ".toml")
BYTE_SPECIALS = {"bos": "<|bos|>", "eos": "<|eos|>"}
METRICS_NAME = "metrics.jsonl"
LOG_NAME = "train.log"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched resume, unusable data)."""


# ------------------------------------------------------------------------------------------ data


# A merge that can never apply: the gpt-2 pre-tokenizer never puts a letter and a newline in one piece. It is
# there because llama.cpp requires a `tokenizer.ggml.merges` array and GGUF writers refuse an empty one.
NO_OP_MERGE = "a \u010a"


def byte_tokenizer_metadata() -> dict[str, Any]:
    """GGUF tokenizer metadata for the byte-level vocabulary: a `gpt2` BPE whose tokens are the 256 bytes
    (id = byte value), then <|bos|> (256) and <|eos|> (257); text tokenizes to its raw bytes."""
    from ternary.training.bpe_trainer import build_metadata

    md = build_metadata([], pre="gpt-2", specials=BYTE_SPECIALS, add_bos=False)
    md["tokenizer.ggml.merges"] = [NO_OP_MERGE]
    return md


def read_text_bytes(path: str | os.PathLike) -> list[bytes]:
    """The bytes of one text file, or of every text file under a folder (sorted, so the order is fixed)."""
    p = Path(path)
    if p.is_file():
        return [p.read_bytes()]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if files:
            return [f.read_bytes() for f in files]
        raise TrainingError(f"data.path {p}: no text files ({', '.join(TEXT_SUFFIXES)}) under it")
    raise TrainingError(f"data.path {p}: no such file or folder")


class ByteWindows:
    """`[B, T+1]` int32 windows of an in-memory token stream in a seeded per-epoch order (same contract as
    `corpus.DataLoader`: window k = tokens [k·T, k·T + T + 1), every window once per epoch)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.n_windows = max(self.tokens.size - 1, 0) // seq_len
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch == 0:
            raise TrainingError(
                f"data: {self.tokens.size} tokens are too few for one batch of {batch_size} x {seq_len + 1}"
            )
        self.epoch, self.batch = 0, 0

    def __iter__(self) -> ByteWindows:
        return self

    def __next__(self) -> np.ndarray:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
        ks = order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        self.batch += 1
        return np.stack([self.tokens[k * self.seq_len : k * self.seq_len + self.seq_len + 1] for k in ks])

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "n_tokens": int(self.tokens.size),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        fixed = {k: v for k, v in mine.items() if k not in ("epoch", "batch")}
        wrong = [f"{k} {state.get(k)!r} != {v!r}" for k, v in fixed.items() if state.get(k) != v]
        if wrong:
            raise TrainingError(f"data position does not match this data: {', '.join(wrong)}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def open_data(cfg: DataConfig, seed: int) -> tuple[Any, dict[str, Any] | None, int]:
    """(loader, tokenizer metadata or None, vocabulary size) for `data.path`."""
    if not cfg.path:
        raise TrainingError("data.path is empty: give a corpus folder or text files (--set data.path=...)")
    path = Path(cfg.path)
    if (path / "index.json").is_file():
        from ternary.training import corpus

        loader = corpus.DataLoader(path, cfg.batch_size, cfg.seq_len, split="train", seed=seed)
        tok_path = path / corpus.TOKENIZER_NAME
        md = None
        if tok_path.is_file():
            from ternary.training.bpe_trainer import load_tokenizer

            md = load_tokenizer(tok_path)
        return loader, md, int(loader.index["n_vocab"])
    if cfg.tokenizer != "bytes":
        raise TrainingError(
            f"data.tokenizer {cfg.tokenizer!r}: raw text is read byte-level only; build a corpus folder "
            "with `python -m ternary.training.corpus` to train on another tokenizer"
        )
    md = byte_tokenizer_metadata()
    eos = md["tokenizer.ggml.eos_token_id"]
    stream: list[int] = []
    for doc in read_text_bytes(path):
        stream.extend(doc)
        stream.append(eos)
    return (
        ByteWindows(np.array(stream, dtype=np.int32), cfg.batch_size, cfg.seq_len, seed),
        md,
        len(md["tokenizer.ggml.tokens"]),
    )


# -------------------------------------------------------------------------------------- the loop


@dataclass
class StepStats:
    step: int  # 1-based number of the update just applied
    loss: float  # CE − λ·H + α·T²·KL, per token
    ce: float
    entropy: float
    kl: float
    grad_norm: float
    lr: float  # the multiplier times optim.lr
    max_logit: float
    tokens: int


class Trainer:
    """Owns model parameters, optimizer, data loader and RNG; `fit()` runs to `schedule.steps`."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: str = "cpu",
        log: Callable[[str], None] | None = None,
        teacher: Any = None,
    ):
        self.log = log or self._log_to_stderr_and_file
        self.xp = backend.load(device)
        self.device = device
        self.loader, self.tokenizer_metadata, n_vocab = open_data(cfg.data, cfg.run.seed)
        if cfg.model.n_vocab == 0:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_vocab=n_vocab))
        elif cfg.model.n_vocab != n_vocab:
            raise TrainingError(
                f"model.n_vocab {cfg.model.n_vocab} != the data's vocabulary {n_vocab} "
                "(set model.n_vocab = 0 to take it from the data)"
            )
        if cfg.data.seq_len > cfg.model.n_ctx_train:
            raise TrainingError(
                f"data.seq_len {cfg.data.seq_len} > model.n_ctx_train {cfg.model.n_ctx_train}"
            )
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model = Transformer(cfg.model, self.xp)
        self.rng = np.random.default_rng(cfg.run.seed)
        self.params = {k: self.xp.asarray(v) for k, v in init_params(cfg.model, self.rng).items()}
        self.optimizer = Optimizer(cfg.optim, self.params, self.xp)
        self.step = 0
        self.tokens_seen = 0
        self.teacher = teacher
        if self.teacher is None and cfg.distill.teacher:
            from ternary.training.distill import make_teacher

            self.teacher = make_teacher(cfg.distill, self.tokenizer_metadata, cfg.model.n_vocab)

    def _log_to_stderr_and_file(self, msg: str) -> None:
        """The default log: stderr, and `train.log` in run.out_dir once that folder exists."""
        print(msg, file=sys.stderr, flush=True)
        out_dir = getattr(self, "out_dir", None)
        if out_dir is not None and out_dir.is_dir():
            with open(out_dir / LOG_NAME, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    # ----------------------------------------------------------------------------------- one step

    def train_step(self) -> StepStats:
        cfg, xp = self.cfg, self.xp
        batches = [next(self.loader) for _ in range(cfg.data.grad_accum)]
        n_tokens = sum(int(b.shape[0] * (b.shape[1] - 1)) for b in batches)
        grads: dict[str, Any] = {}
        ce = ent = kl = max_logit = 0.0
        for batch in batches:
            ids, targets = batch[:, :-1], batch[:, 1:]
            teacher = None
            if self.teacher is not None and cfg.distill.weight > 0:
                teacher = self.teacher.targets(ids, cfg.distill.temperature, cfg.distill.top_k)
            stats, g = self.model.loss_and_grads(
                self.params,
                ids,
                targets,
                grad_scale=1.0 / n_tokens,
                entropy_weight=cfg.run.entropy_weight,
                teacher=teacher,
                distill_weight=cfg.distill.weight,
                temperature=cfg.distill.temperature,
            )
            ce, ent, kl = ce + stats.ce_sum, ent + stats.entropy_sum, kl + stats.kl_sum
            max_logit = max(max_logit, stats.max_abs_logit)
            if grads:
                for name, gi in g.items():
                    xp.add_(grads[name], gi)
            else:
                grads = g
        loss = (ce - cfg.run.entropy_weight * ent + cfg.distill.weight * kl) / n_tokens
        if not math.isfinite(loss):
            raise TrainingError(f"step {self.step + 1}: loss is {loss}; stopping (no checkpoint written)")
        grad_norm = clip_grad_norm_(xp, grads, cfg.optim.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrainingError(f"step {self.step + 1}: gradient norm is {grad_norm}; stopping")
        mult = lr_multiplier(cfg.schedule, self.step)
        self.optimizer.step(self.params, grads, mult)
        self.step += 1
        self.tokens_seen += n_tokens
        return StepStats(
            self.step,
            loss,
            ce / n_tokens,
            ent / n_tokens,
            kl / n_tokens,
            grad_norm,
            mult * cfg.optim.lr,
            max_logit,
            n_tokens,
        )

    # ----------------------------------------------------------------------------------- the loop

    def fit(self, steps: int | None = None) -> list[StepStats]:
        """Train until `steps` (default schedule.steps) updates have been applied in total."""
        cfg = self.cfg
        end = cfg.schedule.steps if steps is None else steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        history: list[StepStats] = []
        t_last, tokens_last = time.perf_counter(), 0
        with open(self.out_dir / METRICS_NAME, "a", encoding="utf-8") as metrics:
            while self.step < end:
                s = self.train_step()
                history.append(s)
                tokens_last += s.tokens
                metrics.write(json.dumps(dataclasses.asdict(s)) + "\n")
                metrics.flush()
                if s.step % cfg.run.log_every == 0 or s.step == end:
                    now = time.perf_counter()
                    tps = tokens_last / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, 0
                    self.log(
                        f"step {s.step:6d}/{end} | loss {s.loss:.4f} | ce {s.ce:.4f} | "
                        f"entropy {s.entropy:.3f} | grad norm {s.grad_norm:.3f} | lr {s.lr:.3e} | "
                        f"{tps:,.0f} tok/s"
                    )
                    for warning in self.health_warnings(s):
                        self.log(f"warning: step {s.step}: {warning}")
                if s.step % cfg.run.ckpt_every == 0 or s.step == end:
                    self.save()
        return history

    def health_warnings(self, s: StepStats) -> list[str]:
        """Signs of a run going wrong that the loss alone hides."""
        run = self.cfg.run
        out = []
        if s.entropy < run.entropy_warn and math.isfinite(s.ce):
            out.append(
                f"mean entropy {s.entropy:.3f} nats < {run.entropy_warn} while the loss looks fine "
                f"({s.ce:.3f}): predictions are collapsing onto few tokens; consider run.entropy_weight > 0"
            )
        if s.max_logit > run.logit_warn:
            out.append(
                f"max |logit| {s.max_logit:.3g} > {run.logit_warn:g}: logits are blowing up; lower the "
                "learning rate or set model.logit_softcap"
            )
        return out

    # -------------------------------------------------------------------------------- checkpoints

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"model/{k}": self.xp.to_host(v) for k, v in self.params.items()}
        opt = self.optimizer.state_dict()
        arrays.update({f"optim/{k}": v for k, v in opt["arrays"].items()})
        return arrays

    def save(self) -> Path:
        path = checkpoint.checkpoint_path(self.out_dir, self.step)
        opt = self.optimizer.state_dict()
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "config": self.cfg.to_dict(),
            "device": self.device,
            "rng": self.rng.bit_generator.state,
            "data": self.loader.state_dict(),
            "optim": {"t": opt["t"], "rules": opt["rules"]},
            "tokenizer": self.tokenizer_metadata,
        }
        checkpoint.save_checkpoint(path, self.state_arrays(), state)
        checkpoint.prune_checkpoints(self.out_dir, self.cfg.run.keep_last)
        return path

    def resume(self) -> Path | None:
        """Load the newest undamaged checkpoint in run.out_dir (damaged ones are reported and skipped);
        returns its path, or None when there is none."""
        for step, path in reversed(checkpoint.list_checkpoints(self.out_dir)):
            try:
                arrays, state = checkpoint.load_checkpoint(path)
            except checkpoint.CheckpointError as exc:
                self.log(f"warning: skipping checkpoint at step {step}: {exc}")
                continue
            self.load_state(arrays, state)
            self._truncate_metrics(self.step)
            self.log(f"resumed from {path} (step {self.step}, {self.tokens_seen:,} tokens seen)")
            return path
        return None

    def load_state(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        saved_model = state["config"]["model"]
        mine = dataclasses.asdict(self.cfg.model)
        diff = [f"{k} {saved_model.get(k)!r} != {v!r}" for k, v in mine.items() if saved_model.get(k) != v]
        if diff:
            raise TrainingError(f"cannot resume: the checkpoint's model differs: {', '.join(diff)}")
        for name in self.params:
            host = arrays[f"model/{name}"]
            self.params[name] = self.xp.asarray(host, host.dtype)
        self.optimizer.load_state_dict(
            {
                "t": state["optim"]["t"],
                "rules": state["optim"]["rules"],
                "arrays": {k[len("optim/") :]: v for k, v in arrays.items() if k.startswith("optim/")},
            }
        )
        self.rng.bit_generator.state = state["rng"]
        self.loader.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines of steps after `step` (they will be recomputed), atomically."""
        path = self.out_dir / METRICS_NAME
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
