"""The BitNet b1.58 forward pass (llama.cpp's ``bitnet`` graph) over a slot-based KV cache.

``Transformer.forward(tokens, positions, slots)`` serves a whole prompt of one slot, one decode token, or a
batch of decode tokens from different slots alike: every token carries its own slot and position. Per layer:
RMSNorm → Q/K/V (ternary, optional ``.scale``) → RoPE → causal GQA attention → attn sub-norm → O → residual →
RMSNorm → gate/up → SiLU or ReLU² gate → ffn sub-norm → down → residual; then the final norm and the head.
The int8 activations of a norm's output are computed once and shared by the matmuls that read it.

Two layouts (``load_transformer(layout=...)``): ``planar`` (default) repacks the ternary weights once (cached
on disk, ``load.py``) and runs all layers of a batch in one jitted call (``fused.forward_layers``);
``reference`` keeps one int8 code per weight and runs layer by layer (``TernaryMatrix``). In ``q8k`` mode both
give the same bits. Traces (``trace=``), ``run_layer`` and swapped ``activations`` quantizers take the
step-by-step path.

Memory: ``load_transformer`` ends by loading every kernel of the planar forward through a twin with no layers
and a one-row head (``Transformer.load_kernels``), which touches no weights, then lets LLVM's library pages
go (``load.release_compiler_pages``) and drops the model file's pages (``GGUFFile.release_pages``): the
weights and the head become resident when the first forward reads them, without LLVM's ~65 MiB beside them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from ternary.engine import activations, attention, cpu_features, kernels, simd
from ternary.engine.fused import StackedLinear, forward_layers
from ternary.engine.head_kernels import F16Head, Q6KHead, Q8_0Head, head_matrix
from ternary.engine.kv_cache import KVCache
from ternary.engine.load import (
    CacheSetting,
    load_stacked_linears,
    planar_misfit,
    release_compiler_pages,
)
from ternary.engine.numa import NumaPlan, NumaSetting
from ternary.engine.weights import DenseMatrix, PlanarQ8KMatrix, TernaryMatrix, dense_matrix
from ternary.formats import quants
from ternary.formats.model_file import LINEAR_NAMES, ModelFile

FFN_ACTS = ("silu", "relu2")
LAYOUTS = ("planar", "reference")
HEAD_KERNEL_TYPES = (quants.Q6_K, quants.Q8_0, quants.F16)  # embedding/head types ``head_kernels`` serves
# Layer attribute of each GGUF linear name
LAYER_FIELDS = dict(zip(LINEAR_NAMES, ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), strict=True))


@dataclass
class Linear:
    """A ternary matmul and the optional scalar ``<name>.scale`` that multiplies its output."""

    matrix: TernaryMatrix | PlanarQ8KMatrix
    scale: float | None = None

    def __call__(self, xq: np.ndarray, x_scale: np.ndarray) -> np.ndarray:
        out = np.empty((xq.shape[0], self.matrix.n_out), dtype=np.float32)
        self.matrix.matmul(xq, x_scale, out)
        if self.scale is not None:
            out *= np.float32(self.scale)
        return out


@dataclass
class Layer:
    """One transformer block's weights (norm weights float32[n], linears as ``Linear``)."""

    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    attn_sub_norm: np.ndarray | None  # BitNet's SubLN; absent for ternary ``llama`` files
    wo: Linear
    ffn_norm: np.ndarray
    w_gate: Linear
    w_up: Linear
    ffn_sub_norm: np.ndarray | None
    w_down: Linear


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    kernels.rms_norm_rows(x, weight, eps, out)
    return out


def rope_tables(positions: np.ndarray, n_rot: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin float32[T, n_rot/2] of ``theta_i = pos · base^(-2i/n_rot)``, rounded as llama.cpp does."""
    theta_scale = np.float32(float(base) ** (-2.0 / n_rot))
    cos = np.empty((positions.shape[0], n_rot // 2), dtype=np.float32)
    sin = np.empty_like(cos)
    kernels.rope_cache(positions, theta_scale, cos, sin)
    return cos, sin


class Transformer:
    """Weights + config + KV cache; ``forward`` evaluates a batch of (token, position, slot) triples."""

    def __init__(
        self,
        config: Any,
        embedding: DenseMatrix,
        head: DenseMatrix,
        layers: Sequence[Layer],
        output_norm: np.ndarray,
        *,
        n_slots: int = 1,
        n_ctx: int | None = None,
        act_quant: str = "q8k",
        ffn_act: str | None = None,
        stacked: dict[str, StackedLinear] | None = None,
        kernel_path: str | None = None,
    ) -> None:
        """``stacked`` (the planar weights of every layer, which ``layers`` view) enables the fused forward;
        ``kernel_path`` names its kernels (``cpu_features.KERNEL_PATHS``; None: the fastest)."""
        self.config = config
        self.embedding = embedding
        self.head = head
        self.layers = list(layers)
        self.output_norm = np.ascontiguousarray(output_norm, dtype=np.float32)
        self.act_quant = activations.normalize_mode(act_quant)
        self.ffn_act = ffn_act or config.ffn_act
        if self.ffn_act not in FFN_ACTS:
            raise ValueError(f"unknown FFN activation {self.ffn_act!r}: expected silu or relu2")
        if config.n_head % config.n_head_kv:
            raise ValueError(f"n_head {config.n_head} is not a multiple of n_head_kv {config.n_head_kv}")
        if len(self.layers) != config.n_layer:
            raise ValueError(f"got {len(self.layers)} layers, the config says {config.n_layer}")
        # ggml's kq_scale: 1/sqrtf(head_dim) in float32
        self._kq_scale = float(np.float32(1.0) / np.sqrt(np.float32(config.head_dim)))
        n_ctx = int(n_ctx or config.n_ctx_train)
        self.cache = KVCache(config.n_layer, n_slots, n_ctx, config.n_head_kv, config.head_dim)
        self.stacked = stacked
        self.isa = simd.ISAS[cpu_features.select_path(kernel_path)]
        if stacked is not None:
            self._norms = _stacked_norms(self.layers)

    @property
    def layout(self) -> str:
        return "reference" if self.stacked is None else "planar"

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    @property
    def n_slots(self) -> int:
        return self.cache.n_slots

    def reset_slot(self, slot: int) -> None:
        self.cache.reset(slot)

    def _quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return activations.quantize(x, self.act_quant)

    def forward(
        self,
        tokens: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        logits_for: Sequence[bool] | np.ndarray | None = None,
        trace: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits float32[n_rows, n_vocab] for every token, or only where ``logits_for`` is true.

        K/V of every token are written at (its slot, its position); each token attends to positions 0..its
        own of its slot. ``trace``, if given, receives llama.cpp-named intermediates (``attn_norm-0``, ...).
        """
        cfg = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int32)
        slots = np.asarray(slots, dtype=np.int32)
        if tokens.ndim != 1 or tokens.shape != positions.shape or tokens.shape != slots.shape:
            raise ValueError(
                f"tokens {tokens.shape}, positions {positions.shape}, slots {slots.shape}: "
                "expected 1-D arrays of the same length"
            )
        if tokens.size == 0:
            raise ValueError("empty batch: no tokens to evaluate")
        if tokens.min() < 0 or tokens.max() >= self.embedding.n_out:
            raise ValueError(
                f"token ids must be in [0, {self.embedding.n_out}), got {tokens.min()}..{tokens.max()}"
            )
        self.cache.check_batch(positions, slots)
        if logits_for is not None:
            logits_for = np.asarray(logits_for, dtype=bool)
            if logits_for.shape != tokens.shape:
                raise ValueError(f"logits_for has shape {logits_for.shape}, expected {tokens.shape}")

        record = _recorder(trace)
        rope = rope_tables(positions, cfg.rope_dim, cfg.rope_base)
        x = np.array(
            self.embedding.rows(tokens), dtype=np.float32, order="C"
        )  # a fresh array: updated in place
        record("embd", x)
        if self.stacked is not None and trace is None and _quantizers_as_imported():
            self._fused_layers(x, positions, slots, rope)
        else:
            for il in range(len(self.layers)):
                x = self._layer(il, x, positions, slots, rope, record)
        self.cache.commit(positions, slots)

        if logits_for is not None:
            x = np.ascontiguousarray(x[logits_for])
        y = rms_norm(x, self.output_norm, cfg.rms_eps)
        record("result_norm", y)
        return self.head.matmul(y)

    def load_kernels(self) -> bool:
        """Load (from Numba's cache, or compile) every kernel the fused forward runs, reading no weights.

        Runs one token through a twin of this model with no layers, a one-row head and a one-position KV
        cache: the same Python path and argument types as a real forward, so no kernel is left for the first
        forward to load, while the stacked weights, the head and the KV cache stay untouched. False (nothing
        done) where the forward would not take the fused path.
        """
        if self.stacked is None or not _quantizers_as_imported():
            return False
        cfg = self.config
        twin = copy.copy(self)
        twin._norms = tuple(None if n is None else n[:0] for n in self._norms)
        twin.embedding = _first_row(self.embedding)
        twin.head = twin.embedding if self.head is self.embedding else _first_row(self.head)
        twin.cache = KVCache(cfg.n_layer, 1, 1, cfg.n_head_kv, cfg.head_dim)
        with np.errstate(all="ignore"):  # no layers: the residual sum reads an unwritten buffer
            twin.forward([0], [0], [0])
        return True

    def _fused_layers(
        self, x: np.ndarray, positions: np.ndarray, slots: np.ndarray, rope: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """Every layer in one jitted call (``fused.forward_layers``), on ``x`` in place."""
        cfg, w = self.config, self.stacked
        attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm = self._norms
        forward_layers(
            self.isa, self.act_quant == "q8k", self.ffn_act == "relu2", attn_sub_norm is not None,
            x, positions, slots, *rope,
            attn_norm, _or_empty(attn_sub_norm), ffn_norm, _or_empty(ffn_sub_norm),
            *(w[name].arrays() for name in LINEAR_NAMES),
            self.cache.k, self.cache.v, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.rope_dim, cfg.rope_neox,
            cfg.rms_eps, self._kq_scale, numba.get_num_threads(),
        )  # fmt: skip

    def run_layer(
        self,
        il: int,
        x: np.ndarray,
        positions: Sequence[int] | np.ndarray,
        slots: Sequence[int] | np.ndarray,
        trace: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Layer ``il`` alone on hidden states ``x`` float32[T, n_embd] (writes its K/V; lengths unchanged).

        For checking one layer against llama.cpp's dump given llama.cpp's own input to it.
        """
        positions = np.asarray(positions, dtype=np.int32)
        slots = np.asarray(slots, dtype=np.int32)
        self.cache.check_batch(positions, slots)
        rope = rope_tables(positions, self.config.rope_dim, self.config.rope_base)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self._layer(il, x, positions, slots, rope, _recorder(trace))

    def _layer(
        self,
        il: int,
        x: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        rope: tuple[np.ndarray, np.ndarray],
        record: Callable[[str, np.ndarray], None],
    ) -> np.ndarray:
        cfg, layer = self.config, self.layers[il]
        n_tok, hd, eps = x.shape[0], cfg.head_dim, cfg.rms_eps
        cos, sin = rope
        h = rms_norm(x, layer.attn_norm, eps)
        record(f"attn_norm-{il}", h)
        hq = self._quantize(h)
        q, k, v = layer.wq(*hq), layer.wk(*hq), layer.wv(*hq)
        attention.apply_rope(q, cos, sin, cfg.n_head, hd, cfg.rope_dim, cfg.rope_neox)
        attention.apply_rope(k, cos, sin, cfg.n_head_kv, hd, cfg.rope_dim, cfg.rope_neox)
        k_cache, v_cache = self.cache.k[il], self.cache.v[il]
        k_cache[slots, positions] = k.reshape(n_tok, cfg.n_head_kv, hd)
        v_cache[slots, positions] = v.reshape(n_tok, cfg.n_head_kv, hd)
        a = np.empty_like(q)
        attention.attention(q, k_cache, v_cache, slots, positions, cfg.n_head, hd, self._kq_scale, a)
        record(f"kqv_out-{il}", a)
        if layer.attn_sub_norm is not None:
            a = rms_norm(a, layer.attn_sub_norm, eps)
            record(f"attn_sub_norm-{il}", a)
        x = x + layer.wo(*self._quantize(a))
        record(f"ffn_inp-{il}", x)

        h = rms_norm(x, layer.ffn_norm, eps)
        hq = self._quantize(h)
        g, u = layer.w_gate(*hq), layer.w_up(*hq)
        f = np.empty_like(g)
        kernels.gated_ffn(g, u, self.ffn_act == "relu2", f)
        record(f"ffn_sub_out-{il}", f)
        if layer.ffn_sub_norm is not None:
            f = rms_norm(f, layer.ffn_sub_norm, eps)
            record(f"ffn_sub_norm-{il}", f)
        x = x + layer.w_down(*self._quantize(f))
        record(f"l_out-{il}", x)
        return x


_QUANTIZERS = (activations.quantize_q8k, activations.quantize_per_token)


def _quantizers_as_imported() -> bool:
    """False when ``activations``' quantizers were replaced (tests wrap them to flip near-tie roundings): the
    fused forward runs its own copies inside Numba, so only the step-by-step path would honour the swap."""
    return (activations.quantize_q8k, activations.quantize_per_token) == _QUANTIZERS


def _stacked_norms(layers: Sequence[Layer]) -> tuple[np.ndarray | None, ...]:
    """(attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm) stacked float32[L, width]; None where absent."""

    def stack(field: str) -> np.ndarray | None:
        rows = [getattr(layer, field) for layer in layers]
        return None if rows[0] is None else np.ascontiguousarray(np.stack(rows), dtype=np.float32)

    return tuple(stack(f) for f in ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm"))


def _first_row(matrix: DenseMatrix) -> DenseMatrix:
    """A head of ``matrix``'s kind over its first row only (same kernels and argument types); other kinds
    as they are."""
    if not isinstance(matrix, (Q6KHead, Q8_0Head, F16Head)):
        return matrix
    return type(matrix)(matrix.raw[: matrix.row_bytes], (1, matrix.n_in), matrix.isa.name)


def _or_empty(a: np.ndarray | None) -> np.ndarray:
    return np.zeros((1, 1), dtype=np.float32) if a is None else a


def _recorder(trace: dict[str, np.ndarray] | None) -> Callable[[str, np.ndarray], None]:
    def record(name: str, value: np.ndarray) -> None:
        if trace is not None:
            trace[name] = value.copy()

    return record


def load_transformer(
    model_file: ModelFile,
    *,
    n_slots: int = 1,
    n_ctx: int | None = None,
    act_quant: str = "q8k",
    ffn_act: str | None = None,
    layout: str = "planar",
    kernel_path: str | None = None,
    repack_cache: CacheSetting = None,
    numa: NumaSetting | NumaPlan = None,
) -> Transformer:
    """Repack a validated model file into the compute layouts.

    ``layout`` ``planar`` (fused forward; ``repack_cache``: None = the default cache folder, False = no cache,
    or a folder) or ``reference``; ``kernel_path`` forces a kernel path (see ``cpu_features``); ``numa``
    places each node's rows of the weights in its memory (``numa.resolve_plan``; one node: nothing to do).
    """
    mf = model_file
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    misfit = planar_misfit(mf) if layout == "planar" else None
    if misfit is not None:
        warnings.warn(f"{mf.path}: {misfit}; using the reference layout", RuntimeWarning, stacklevel=2)
        layout = "reference"
    stacked = load_stacked_linears(mf, repack_cache, numa=numa) if layout == "planar" else None

    def vector(info: Any) -> np.ndarray | None:
        return None if info is None else np.ascontiguousarray(mf.dequantize(info), dtype=np.float32)

    def linears(il: int) -> dict[str, Linear]:
        if stacked is not None:
            return {
                LAYER_FIELDS[name]: Linear(s.matrix(il, kernel_path), s.layer_scale(il))
                for name, s in stacked.items()
            }
        out = {}
        for name, lin in mf.layer(il).linears().items():
            out[LAYER_FIELDS[name]] = Linear(TernaryMatrix.from_codes(*mf.ternary_codes(lin)), lin.scale)
        return out

    def dense(info: Any) -> DenseMatrix:
        if info.ggml_type in HEAD_KERNEL_TYPES:  # over the file's bytes, in llama.cpp's float order
            return head_matrix(info.ggml_type, info.raw, info.shape, kernel_path)
        return dense_matrix(info.ggml_type, info.raw, info.shape, lambda: mf.dequantize(info))

    layers = []
    for il in range(mf.config.n_layer):
        t = mf.layer(il)
        layers.append(
            Layer(
                attn_norm=vector(t.attn_norm),
                attn_sub_norm=vector(t.attn_sub_norm),
                ffn_norm=vector(t.ffn_norm),
                ffn_sub_norm=vector(t.ffn_sub_norm),
                **linears(il),
            )
        )
    embedding = dense(mf.token_embd)
    head = embedding if mf.config.tied_head else dense(mf.output)
    model = Transformer(
        mf.config,
        embedding,
        head,
        layers,
        vector(mf.output_norm),
        n_slots=n_slots,
        n_ctx=n_ctx,
        act_quant=act_quant,
        ffn_act=ffn_act,
        stacked=stacked,
        kernel_path=kernel_path,
    )
    if model.load_kernels():  # before the first forward makes the weights and the head resident
        release_compiler_pages()
    mf.gguf.release_pages()  # what was read is copied; the head's pages come back as the forward reads them
    return model
