"""Tokens per second of the trainer's step (forward, backward, gradient clipping, optimizer update).

    python bench/train_speed.py --device cuda --n-embd 512 --n-layer 6 --seq 512 --batch 16
    python bench/train_speed.py --device cuda --profile      # + host and GPU time per op
    python bench/train_speed.py --device cuda --gemm         # + the GEMM kernel alone, in TFLOP/s

Synthetic uniform tokens (speed does not depend on the data). Prints one JSON line; bench/
torch_train_reference.py measures the same model in PyTorch for comparison. Timed steps exclude warm-up
steps (kernel compilation, the memory pool filling up).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from ternary.bench.train_shape import add_shape_args
from ternary.training import backend
from ternary.training.config import ModelShape, OptimConfig
from ternary.training.model import Transformer, init_params, param_shapes
from ternary.training.optim import Optimizer, clip_grad_norm_


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=backend.DEVICES, default="cuda")
    add_shape_args(p)
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--profile", action="store_true", help="also time each op (host and GPU time)")
    p.add_argument("--gemm", action="store_true", help="also time the GEMM kernel alone")
    return p.parse_args(argv)


def model_shape(args: argparse.Namespace) -> ModelShape:
    return ModelShape(
        n_vocab=args.vocab, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        n_head_kv=args.n_head_kv, n_ff=args.n_ff, n_ctx_train=args.seq, ffn_act=args.ffn_act,
    )  # fmt: skip


def n_params(shape: ModelShape) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(shape).values())


def synchronizer(device: str) -> Callable[[], None]:
    if device == "cuda":
        from numba import cuda

        return cuda.synchronize
    return lambda: None


class OpTimer:
    """A stand-in for the backend that times every op while `active`: host time of the call (launch cost,
    plus any sync inside the op) and, on CUDA, GPU time between events recorded around it."""

    def __init__(self, xp: types.ModuleType, device: str):
        self.active = False
        self.host: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.events: list[tuple[str, Any, Any]] = []
        self._cuda = None
        if device == "cuda":
            from numba import cuda

            self._cuda = cuda
        for name in backend.OPS:
            setattr(self, name, self._timed(name, getattr(xp, name)))

    def _timed(self, name: str, op: Callable) -> Callable:
        def call(*a: Any, **k: Any) -> Any:
            if not self.active:
                return op(*a, **k)
            start = end = None
            if self._cuda is not None:
                start = self._cuda.event()
                start.record()
            t0 = time.perf_counter()
            out = op(*a, **k)
            self.host[name] += time.perf_counter() - t0
            self.calls[name] += 1
            if self._cuda is not None:
                end = self._cuda.event()
                end.record()
                self.events.append((name, start, end))
            return out

        return call

    def report(self, steps: int) -> dict[str, dict[str, float]]:
        """Per op and step: calls, host ms and GPU ms, largest GPU (or host) time first."""
        gpu: collections.Counter = collections.Counter()
        for name, start, end in self.events:
            end.synchronize()
            gpu[name] += self._cuda.event_elapsed_time(start, end) / 1000
        order = gpu if gpu else self.host
        return {
            name: {
                "calls": self.calls[name] // steps,
                "host_ms": round(1000 * self.host[name] / steps, 2),
                "gpu_ms": round(1000 * gpu[name] / steps, 2),
            }
            for name, _ in order.most_common()
        }


def run(
    args: argparse.Namespace, xp: Any, sync: Callable[[], None], on_timed: Callable[[], None] | None = None
) -> tuple[float, float]:
    """(tokens per second, mean loss of the timed steps) over `args.steps` steps after the warm-up;
    `on_timed` is called when the timed steps begin."""
    shape = model_shape(args)
    rng = np.random.default_rng(0)
    model = Transformer(shape, xp)
    params = {k: xp.asarray(v) for k, v in init_params(shape, rng).items()}
    optimizer = Optimizer(OptimConfig(name=args.optimizer), params, xp)
    tokens = rng.integers(0, args.vocab, size=(args.warmup + args.steps, args.batch, args.seq + 1))
    n_tok = args.batch * args.seq
    losses = []
    t0 = 0.0
    for i, batch in enumerate(tokens):
        if i == args.warmup:
            sync()
            if on_timed is not None:
                on_timed()
            t0 = time.perf_counter()
        stats, grads = model.loss_and_grads(params, batch[:, :-1], batch[:, 1:], 1.0 / n_tok)
        clip_grad_norm_(xp, grads, 1.0)
        optimizer.step(params, grads, 1.0)
        losses.append(stats.ce_sum / n_tok)
    sync()
    elapsed = time.perf_counter() - t0
    return args.steps * n_tok / elapsed, float(np.mean(losses[args.warmup :]))


def gemm_report(xp: Any, sync: Callable[[], None], args: argparse.Namespace) -> dict[str, Any]:
    """TFLOP/s of `matmul` at the model's own shapes (forward, input gradient, weight gradient)."""
    n = args.batch * args.seq
    out = {}
    for label, (m, k, nn, ta, tb) in {
        "fwd x@W^T": (n, args.n_embd, args.n_ff, False, True),
        "bwd dY@W": (n, args.n_ff, args.n_embd, False, False),
        "bwd dY^T@X": (args.n_ff, n, args.n_embd, True, False),
        "head x@E^T": (n, args.n_embd, args.vocab, False, True),
    }.items():
        a = xp.asarray(np.random.default_rng(1).standard_normal((k, m) if ta else (m, k), dtype=np.float32))
        b = xp.asarray(np.random.default_rng(2).standard_normal((nn, k) if tb else (k, nn), dtype=np.float32))
        xp.matmul(a, b, ta, tb)
        sync()
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            xp.matmul(a, b, ta, tb)
        sync()
        dt = (time.perf_counter() - t0) / reps
        out[f"{label} {m}x{k}x{nn}"] = round(2 * m * k * nn / dt / 1e12, 2)
    if args.device == "cuda":
        from ternary.training import cuda_kernels

        if not cuda_kernels.SIMULATOR:
            ptx = "".join(cuda_kernels.gemm.inspect_asm().values())
            out["gemm local-memory instructions"] = ptx.count("ld.local") + ptx.count("st.local")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    xp = backend.load(args.device)
    sync = synchronizer(args.device)
    tps, loss = run(args, xp, sync)
    report: dict[str, Any] = {
        "impl": "ternary", "device": args.device, "optimizer": args.optimizer,
        "params": n_params(model_shape(args)), "seq": args.seq, "batch": args.batch,
        "tokens_per_s": round(tps), "loss": round(loss, 4),
    }  # fmt: skip
    if args.gemm:
        report["gemm_tflops"] = gemm_report(xp, sync, args)
    if args.profile:
        timer = OpTimer(xp, args.device)
        profile_args = argparse.Namespace(**{**vars(args), "steps": 2, "warmup": 1})

        def start() -> None:
            timer.active = True

        run(profile_args, timer, sync, on_timed=start)
        report["profile_per_step"] = timer.report(profile_args.steps)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
