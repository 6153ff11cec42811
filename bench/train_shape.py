"""The model shape and timing flags shared by our trainer's speed bench and its PyTorch peer, so both time the
same model by construction."""

from __future__ import annotations

import argparse


def add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-head-kv", type=int, default=4)
    p.add_argument("--n-ff", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ffn-act", choices=("silu", "relu2"), default="relu2")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
