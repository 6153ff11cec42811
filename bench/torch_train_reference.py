"""The trainer's BitNet b1.58 model in plain PyTorch (eager, float32): a speed peer for bench/train_speed.py.

    python bench/torch_train_reference.py --n-embd 512 --n-layer 6 --seq 512 --batch 16

Used only on the GPU machine to compare tokens per second on the same model shape; the ternary package
never imports torch. The model is the one `ternary.training.model` trains: RMSNorm, BitLinear with absmean
ternary weights and per-token int8 activations (straight-through estimators, the shared input quantized once),
NEOX RoPE, causal GQA attention, sub-norms, relu²/silu gated FFN, tied head, cross-entropy; the step is
forward, backward, global-norm clipping and AdamW (torch.optim.AdamW, its default implementation). Matmuls run
at PyTorch's default float32 precision (no TF32). `--attention sdpa` (default) uses
F.scaled_dot_product_attention; `--attention manual` materialises the score matrix like our backend does.
Prints one JSON line in train_speed.py's format.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from ternary.bench.train_shape import add_shape_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--attention", choices=("sdpa", "manual"), default="sdpa")
    return p.parse_args(argv)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantization with a straight-through gradient."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    inv = torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax))
    q = (x * scale).round().clamp(-128, 127) * inv
    return x + (q - x).detach()


def ternary_weight(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Absmean ternary weights W_t·γ with a straight-through gradient."""
    gamma = w.abs().mean() + eps
    q = (w / gamma).round().clamp(-1, 1) * gamma
    return w + (q - w).detach()


class BitNet(torch.nn.Module):
    def __init__(self, a: argparse.Namespace):
        super().__init__()
        self.a = a
        d, hd = a.n_embd, a.n_embd // a.n_head
        kv = a.n_head_kv * hd
        std = 0.02
        out_std = std / (2 * a.n_layer) ** 0.5

        def mat(rows: int, cols: int, s: float) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(rows, cols) * s)

        def norm(n: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.ones(n))

        self.embd = mat(a.vocab, d, std)
        self.blocks = torch.nn.ModuleList()
        for _ in range(a.n_layer):
            blk = torch.nn.ParameterDict(
                {
                    "attn_norm": norm(d), "q": mat(d, d, std), "k": mat(kv, d, std), "v": mat(kv, d, std),
                    "sub_norm": norm(d), "o": mat(d, d, out_std), "ffn_norm": norm(d),
                    "gate": mat(a.n_ff, d, std), "up": mat(a.n_ff, d, std), "ffn_sub_norm": norm(a.n_ff),
                    "down": mat(d, a.n_ff, out_std),
                }
            )  # fmt: skip
            self.blocks.append(blk)
        self.out_norm = norm(d)
        inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.arange(a.seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * self.cos - x2 * self.sin, x1 * self.sin + x2 * self.cos), dim=-1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.a.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        t = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        a = self.a
        b, t = ids.shape
        hd = a.n_embd // a.n_head
        eps = 1e-5
        x = self.embd[ids]
        for p in self.blocks:
            h = quantize_activations(F.rms_norm(x, (a.n_embd,), p["attn_norm"], eps))
            q = F.linear(h, ternary_weight(p["q"])).view(b, t, a.n_head, hd).transpose(1, 2)
            k = F.linear(h, ternary_weight(p["k"])).view(b, t, a.n_head_kv, hd).transpose(1, 2)
            v = F.linear(h, ternary_weight(p["v"])).view(b, t, a.n_head_kv, hd).transpose(1, 2)
            att = self.attention(self.rope(q), self.rope(k), v).transpose(1, 2).reshape(b, t, a.n_embd)
            att = quantize_activations(F.rms_norm(att, (a.n_embd,), p["sub_norm"], eps))
            x = x + F.linear(att, ternary_weight(p["o"]))
            h = quantize_activations(F.rms_norm(x, (a.n_embd,), p["ffn_norm"], eps))
            g, u = F.linear(h, ternary_weight(p["gate"])), F.linear(h, ternary_weight(p["up"]))
            f = (F.silu(g) if a.ffn_act == "silu" else F.relu(g).square()) * u
            f = quantize_activations(F.rms_norm(f, (a.n_ff,), p["ffn_sub_norm"], eps))
            x = x + F.linear(f, ternary_weight(p["down"]))
        return F.linear(F.rms_norm(x, (a.n_embd,), self.out_norm, eps), self.embd)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = BitNet(a).to(dev)
    matrices = [p for p in model.parameters() if p.ndim == 2]
    norms = [p for p in model.parameters() if p.ndim == 1]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": norms, "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    tokens = torch.randint(0, a.vocab, (a.warmup + a.steps, a.batch, a.seq + 1), device=dev)
    losses = []
    t0 = 0.0
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids, targets = tokens[i, :, :-1], tokens[i, :, 1:]
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    report = {
        "impl": f"torch-eager-fp32-{a.attention}", "device": torch.cuda.get_device_name(),
        "optimizer": "adamw", "params": sum(p.numel() for p in model.parameters()), "seq": a.seq,
        "batch": a.batch, "tokens_per_s": round(a.steps * a.batch * a.seq / elapsed),
        "loss": round(sum(losses[a.warmup :]) / a.steps, 4), "torch": torch.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
