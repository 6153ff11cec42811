"""Warmup-stable-decay (WSD) learning-rate schedule, as a multiplier of the peak learning rates.

Linear warmup to the peak, a long constant stage, then a decay over the last `decay_frac` of the steps down
to `min_lr_ratio` (linear, cosine or 1−sqrt). The constant stage lets a run be extended or branched from any
checkpoint before the decay; only the decay depends on the final step count.
"""

from __future__ import annotations

import math

from ternary.training.config import ScheduleConfig


def decay_start(cfg: ScheduleConfig) -> int:
    """The first step of the decay stage."""
    return cfg.steps - round(cfg.decay_frac * cfg.steps)


def lr_multiplier(cfg: ScheduleConfig, step: int) -> float:
    """Multiplier for update number `step` (0-based): (step+1)/warmup while warming up, 1 while stable,
    then falling to `min_lr_ratio`, which the last step (steps − 1) reaches exactly; steps past the end keep
    the last value (a run extended beyond its schedule)."""
    if step < 0:
        raise ValueError(f"step must be ≥ 0, got {step}")
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    start = decay_start(cfg)
    if step < start or start == cfg.steps:  # stable, or a schedule without a decay stage (kept past its end)
        return 1.0
    progress = min(1.0, (step - start + 1) / (cfg.steps - start))
    lo = cfg.min_lr_ratio
    if cfg.decay_shape == "linear":
        return 1.0 - (1.0 - lo) * progress
    if cfg.decay_shape == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - lo) * math.sqrt(progress)  # "sqrt"
