"""A float64 NumPy forward pass of llama.cpp's ``bitnet`` graph: the independent yardstick for the engine.

Written from the spec (shared/spec/bitnet-gguf.md §4), not from ``ternary.engine``: no imports from it. It
takes the dequantized tensors by their GGUF names (numpy order, rows = outputs) and computes everything in
float64, with RoPE angles ``pos · base^(-2i/d)`` computed exactly. Options emulate what an int8 engine does:

* ``act_quant``: ``None`` (float activations), ``"q8k"`` (llama.cpp's Q8_K per 256 values, round half to even)
  or ``"per_token"`` (BitNet absmax per token) before every ternary linear;
* ``head_act``: ``None``, ``"f16"`` (activations rounded to float16), ``"q8_0"`` or ``"q8k"`` before the head.

Run as a script to print the reference next to llama.cpp's logits for one oracle model:
``python tests/reference_forward.py ../shared/oracle/tiny-tq2_0-f16.gguf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def q8k_roundtrip(x: np.ndarray) -> np.ndarray:
    """Q8_K quantize-dequantize rows of ``x`` as llama.cpp's C code: float32 ``iscale = -127/max``, then the
    exact product ``iscale·x`` rounded half to even (its build fuses the product and the rounding trick into
    one FMA).
    """
    x32 = np.asarray(x, dtype=np.float32)
    t, k = x32.shape
    blocks = x32.reshape(t, k // 256, 256)
    first_max = np.abs(blocks).argmax(axis=2)
    signed_max = np.take_along_axis(blocks, first_max[:, :, None], axis=2)
    safe = np.where(signed_max == 0, np.float32(1.0), signed_max)
    iscale = np.float32(-127.0) / safe
    q = np.minimum(127.0, np.rint(iscale.astype(np.float64) * blocks.astype(np.float64)))
    d = np.float32(1.0) / iscale
    out = q.astype(np.float64) * d.astype(np.float64)
    return np.where(signed_max == 0, 0.0, out).reshape(t, k)


def per_token_roundtrip(x: np.ndarray) -> np.ndarray:
    """BitNet absmax: ``clamp(round(x · 127/max|x|), -128, 127) · max|x|/127`` per row (float32 scale)."""
    x32 = np.asarray(x, dtype=np.float32)
    amax = np.abs(x32).max(axis=1, keepdims=True)
    s = np.float32(127.0) / np.where(amax == 0, np.float32(1.0), amax)
    q = np.clip(np.rint(x32 * s), -128, 127)
    return np.where(amax == 0, 0.0, q.astype(np.float64) / s.astype(np.float64))


def q8_0_roundtrip(x: np.ndarray) -> np.ndarray:
    """Q8_0 per 32 values: ``rint(x · 127/amax)`` times the float16-rounded ``amax/127``."""
    x32 = np.asarray(x, dtype=np.float32)
    t, k = x32.shape
    blocks = x32.reshape(t, k // 32, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    inv = np.float32(127.0) / np.where(amax == 0, np.float32(1.0), amax)
    q = np.rint(blocks * inv)
    d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float64)
    return (q * d).reshape(t, k)


ACT_EMULATIONS = {
    None: lambda x: np.asarray(x, dtype=np.float64),
    "q8k": q8k_roundtrip,
    "per_token": per_token_roundtrip,
    "q8_0": q8_0_roundtrip,
    "f16": lambda x: np.asarray(x, dtype=np.float16).astype(np.float64),
}


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, neox: bool) -> np.ndarray:
    """Rotate the first ``n_rot`` dims of every head; ``x`` is [T, heads, head_dim]."""
    out = x.copy()
    half = n_rot // 2
    theta = positions[:, None].astype(np.float64) * base ** (-2.0 * np.arange(half) / n_rot)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if neox:
        x0, x1 = x[..., :half], x[..., half:n_rot]
        out[..., :half] = x0 * c - x1 * s
        out[..., half:n_rot] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * c - x1 * s
        out[..., 1:n_rot:2] = x0 * s + x1 * c
    return out


def reference_forward(
    cfg: Any,
    tensors: Mapping[str, np.ndarray],
    tokens: Sequence[int],
    *,
    act_quant: str | None = "q8k",
    head_act: str | None = None,
    ffn_act: str | None = None,
    trace: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """float64 logits [T, n_vocab] for ``tokens`` at positions 0..T-1 of a fresh sequence.

    ``cfg`` needs ``n_head, n_head_kv, head_dim, rms_eps, rope_base, rope_dim, rope_neox, ffn_act, n_layer``.
    ``tensors`` maps GGUF names to dequantized arrays (``blk.N.attn_q.scale`` etc. optional).
    """
    act = ACT_EMULATIONS[act_quant]
    ffn_act = ffn_act or cfg.ffn_act
    eps = cfg.rms_eps
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    tokens = np.asarray(tokens)
    n = tokens.shape[0]
    positions = np.arange(n)

    def t64(name: str) -> np.ndarray:
        return np.asarray(tensors[name], dtype=np.float64)

    def linear(il: int, kind: str, h: np.ndarray) -> np.ndarray:
        y = act(h) @ t64(f"blk.{il}.{kind}.weight").T
        scale = tensors.get(f"blk.{il}.{kind}.scale")
        return y if scale is None else y * float(np.asarray(scale).reshape(-1)[0])

    def record(name: str, value: np.ndarray) -> None:
        if trace is not None:
            trace[name] = value

    causal = np.tril(np.ones((n, n), dtype=bool))
    x = t64("token_embd.weight")[tokens]
    record("embd", x)
    for il in range(cfg.n_layer):
        h = rms_norm(x, t64(f"blk.{il}.attn_norm.weight"), eps)
        record(f"attn_norm-{il}", h)
        q = linear(il, "attn_q", h).reshape(n, nh, hd)
        k = linear(il, "attn_k", h).reshape(n, nkv, hd)
        v = linear(il, "attn_v", h).reshape(n, nkv, hd)
        q = rope(q, positions, cfg.rope_dim, cfg.rope_base, cfg.rope_neox)
        k = rope(k, positions, cfg.rope_dim, cfg.rope_base, cfg.rope_neox)
        group = nh // nkv
        a = np.empty((n, nh, hd))
        for head in range(nh):
            scores = q[:, head] @ k[:, head // group].T / math.sqrt(hd)
            scores = np.where(causal, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            a[:, head] = p @ v[:, head // group]
        a = a.reshape(n, nh * hd)
        record(f"kqv_out-{il}", a)
        if f"blk.{il}.attn_sub_norm.weight" in tensors:  # BitNet's SubLN (absent in ``llama`` files)
            a = rms_norm(a, t64(f"blk.{il}.attn_sub_norm.weight"), eps)
            record(f"attn_sub_norm-{il}", a)
        x = x + linear(il, "attn_output", a)
        record(f"ffn_inp-{il}", x)
        h = rms_norm(x, t64(f"blk.{il}.ffn_norm.weight"), eps)
        g, u = linear(il, "ffn_gate", h), linear(il, "ffn_up", h)
        f = (np.maximum(g, 0.0) ** 2 if ffn_act == "relu2" else g / (1.0 + np.exp(-g))) * u
        record(f"ffn_sub_out-{il}", f)
        if f"blk.{il}.ffn_sub_norm.weight" in tensors:
            f = rms_norm(f, t64(f"blk.{il}.ffn_sub_norm.weight"), eps)
            record(f"ffn_sub_norm-{il}", f)
        x = x + linear(il, "ffn_down", f)
        record(f"l_out-{il}", x)
    y = rms_norm(x, t64("output_norm.weight"), eps)
    record("result_norm", y)
    head = t64("output.weight") if "output.weight" in tensors else t64("token_embd.weight")
    return ACT_EMULATIONS[head_act](y) @ head.T


# ---------------------------------------------------------------- comparing int8 engines: near-tie roundings


def exact_scaled(x: np.ndarray, mode: str) -> np.ndarray:
    """The exact ``x · scale`` an int8 quantizer rounds (``mode``: q8k, per_token or q8_0), in float64."""
    x32 = np.asarray(x, dtype=np.float32)
    rows = x32.shape[0]
    if mode == "q8k":
        blocks = x32.reshape(rows, -1, 256)
        first_max = np.abs(blocks).argmax(axis=2)
        signed_max = np.take_along_axis(blocks, first_max[:, :, None], axis=2)
        scale = np.float32(-127.0) / np.where(signed_max == 0, np.float32(1.0), signed_max)
    else:
        blocks = x32.reshape(rows, -1, 32 if mode == "q8_0" else x32.shape[1])
        amax = np.abs(blocks).max(axis=2, keepdims=True)
        scale = np.float32(127.0) / np.where(amax == 0, np.float32(1.0), amax)
    return (scale.astype(np.float64) * blocks.astype(np.float64)).reshape(x32.shape)


class NearTieFlipper:
    """Wraps the int8 quantizers of an engine module to record, and flip, roundings next to a tie (k + 1/2).

    Two correct implementations that differ by float32 round-off may round such a value differently; the
    choice then propagates through every later layer (and, through attention, every later token). ``flips``
    holds (call index, row, column) triples whose int8 value moves to the other integer next to the exact
    product; calls are counted from 0 after every ``distances.clear()``.
    """

    MODES = {"quantize_q8k": "q8k", "quantize_per_token": "per_token", "quantize_q8_0": "q8_0"}

    def __init__(self, quantizers: Any) -> None:
        self.module = quantizers
        names = [*self.MODES, "round_to_f16"]
        self.originals = {name: getattr(quantizers, name) for name in names}
        self.flips: set[tuple[int, int, int]] = set()
        self.distances: list[np.ndarray] = []
        for name, mode in self.MODES.items():
            setattr(quantizers, name, self._wrap(self.originals[name], mode))
        quantizers.round_to_f16 = self._wrap_f16(self.originals["round_to_f16"])

    def _wrap_f16(self, round_to_f16: Callable) -> Callable:
        """The F16 head input is a rounding too: a value next to the midpoint of two float16 neighbours."""

        def wrapped(x: np.ndarray) -> np.ndarray:
            x16 = round_to_f16(x)
            v = np.asarray(x, dtype=np.float64)
            near = np.asarray(x16, dtype=np.float64)
            toward = np.where(v >= near, np.float16(np.inf), np.float16(-np.inf))
            other = np.nextafter(near.astype(np.float16), toward).astype(np.float64)  # the other neighbour
            gap = np.abs(other - near)
            frac = np.where(gap > 0, np.abs(v - near) / np.where(gap > 0, gap, 1.0), 0.0)
            call = len(self.distances)
            # Same units as the int8 quantizers' distances: there one float32 ulp is at most 2**-17 of a step
            # (values up to 127), here it is 2**-13 of an F16 step, so scale by 2**-4.
            self.distances.append(np.abs(frac - 0.5) / 16.0)
            for c, t, j in self.flips:
                if c == call:
                    x16 = np.array(x16, copy=True)
                    x16[t, j] = other[t, j]
            return x16

        return wrapped

    def _wrap(self, quantize: Callable, mode: str) -> Callable:
        def wrapped(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xq, scale = quantize(x)
            v = exact_scaled(x, mode)
            call = len(self.distances)
            self.distances.append(np.abs(v - np.floor(v) - 0.5))
            for c, t, j in self.flips:
                if c == call:
                    xq = xq.copy()
                    xq[t, j] += 1 if v[t, j] > xq[t, j] else -1
            return xq, scale

        return wrapped

    def restore(self) -> None:
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)


def explain_by_near_ties(
    quantizers: Any,
    run: Callable[[], np.ndarray],
    want: np.ndarray,
    *,
    atol: float = 1e-3,
    max_flips: int = 8,
    tie_tol: float = 2e-5,
) -> list[tuple[int, int, int, float]]:
    """Show that ``run()`` (a batch forward, rows = tokens) differs from ``want`` only by near-tie roundings.

    ``quantizers`` is the engine module whose ``quantize_q8k`` / ``quantize_per_token`` / ``quantize_q8_0``
    every int8 matmul (head included) goes through.

    Greedy: at the first row off by more than ``atol``, flip the rounding within ``tie_tol`` of a tie, in that
    row, that best repairs it; repeat until every row is within ``atol``. Returns the flips (call, row,
    column, distance); raises AssertionError if that cannot explain the difference (a real discrepancy).
    """
    flipper = NearTieFlipper(quantizers)
    found: list[tuple[int, int, int, float]] = []
    try:
        for _ in range(max_flips + 1):
            flipper.distances.clear()
            err = np.abs(run() - want).reshape(want.shape[0], -1).max(axis=1)
            if err.max() <= atol:
                return found
            row = int(np.argmax(err > atol))
            candidates = sorted(
                (float(d[row, j]), call, row, int(j))
                for call, d in enumerate(list(flipper.distances))
                for j in np.flatnonzero(d[row] < tie_tol)
            )
            best: tuple[float, tuple[int, int, int, float]] | None = None
            for dist, call, r, j in candidates:
                flipper.flips.add((call, r, j))
                flipper.distances.clear()
                row_err = float(np.abs(run() - want)[row].max())
                flipper.flips.discard((call, r, j))
                if best is None or row_err < best[0]:
                    best = (row_err, (call, r, j, dist))
            assert best is not None and best[0] < err[row], (
                f"row {row} differs by {err[row]:.3g} and no rounding within {tie_tol} of a tie explains it"
            )
            flipper.flips.add(best[1][:3])
            found.append(best[1])
        raise AssertionError(f"more than {max_flips} near-tie flips would be needed: {found}")
    finally:
        flipper.restore()


HEAD_ACT_FOR_TYPE = {1: "f16", 8: "q8_0", 14: "q8k"}  # ggml type of the head → llama.cpp's activation format


def load_gguf(path: str) -> tuple[Any, dict[str, np.ndarray], str | None]:
    """(config, dequantized tensors, the head's activation format) through ``ternary.formats``."""
    from ternary.formats.model_file import open_model

    mf = open_model(path)
    gguf = mf.gguf
    tensors = {name: gguf.dequantize(name) for name in gguf.tensors}
    head_name = "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight"
    return mf.config, tensors, HEAD_ACT_FOR_TYPE.get(gguf.tensors[head_name].ggml_type)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    model_path = Path(sys.argv[1])
    cfg, tensors, head_act = load_gguf(str(model_path))
    folder = model_path.with_suffix("")
    ids = [int(t) for t in (folder / "prompt.batch.tokens.txt").read_text().split(",")]
    want = np.load(folder / "prompt.batch.logits.npy")
    got = reference_forward(cfg, tensors, ids, head_act=head_act)
    print(
        f"{model_path.name}: max|Δ| {np.abs(got - want).max():.2e}, top-1 agreement "
        f"{np.mean(got.argmax(1) == want.argmax(1)):.3f}"
    )
