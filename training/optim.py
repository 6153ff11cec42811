"""Optimizers: AdamW, or Muon for the hidden 2-D weights with AdamW/Lion for embeddings and norms.

`Optimizer` assigns each parameter an update rule once, keeps that rule's state (moments, momentum) as
backend arrays, and applies all updates through the backend's fused `adamw_`, `lion_` and `muon_` ops.
Weight decay is decoupled and applies to matrices only (never to RMSNorm weights). `clip_grad_norm_`
scales all gradients together so their global L2 norm is at most `max_norm`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from ternary.training.config import OptimConfig
from ternary.training.model import is_hidden_matrix

Array = Any

STATE_SLOTS = {"adamw": ("m", "v"), "lion": ("m",), "muon": ("buf",)}


def clip_grad_norm_(xp: ModuleType, grads: dict[str, Array], max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / ‖g‖) (global norm over all tensors); returns ‖g‖ before.
    max_norm ≤ 0 only measures. A non-finite norm is returned as is and nothing is scaled."""
    total = float(np.sqrt(sum(xp.sum_squares(g) for g in grads.values())))
    if max_norm > 0 and np.isfinite(total) and total > max_norm:
        for g in grads.values():
            xp.scale_(g, max_norm / (total + 1e-6))
    return total


class Optimizer:
    """One update rule per parameter; `step(params, grads, lr_mult)` updates `params` in place."""

    def __init__(self, cfg: OptimConfig, params: dict[str, Array], xp: ModuleType):
        self.cfg = cfg
        self.xp = xp
        self.t = 0  # updates applied so far
        self.rules: dict[str, str] = {}
        for name, p in params.items():
            if cfg.name == "muon" and is_hidden_matrix(name):
                self.rules[name] = "muon"
            elif cfg.name == "muon":
                self.rules[name] = cfg.aux_optimizer
            else:
                self.rules[name] = "adamw"
            if self.rules[name] == "muon" and len(p.shape) != 2:
                raise ValueError(f"{name}: Muon needs a 2-D weight, got shape {tuple(p.shape)}")
        self.state: dict[str, dict[str, Array]] = {
            name: {slot: xp.zeros_like(params[name]) for slot in STATE_SLOTS[rule]}
            for name, rule in self.rules.items()
        }

    def step(self, params: dict[str, Array], grads: dict[str, Array], lr_mult: float) -> None:
        cfg, xp = self.cfg, self.xp
        self.t += 1
        for name, rule in self.rules.items():
            p, g, s = params[name], grads[name], self.state[name]
            wd = cfg.weight_decay if len(p.shape) >= 2 else 0.0
            if rule == "adamw":
                xp.adamw_(p, g, s["m"], s["v"], cfg.lr * lr_mult, cfg.beta1, cfg.beta2, cfg.eps, wd, self.t)
            elif rule == "lion":
                xp.lion_(p, g, s["m"], cfg.lr * lr_mult, cfg.lion_beta1, cfg.lion_beta2, wd)
            else:
                xp.muon_(
                    p, g, s["buf"], cfg.muon_lr * lr_mult, cfg.muon_momentum, cfg.nesterov, wd, cfg.ns_steps
                )

    def state_dict(self) -> dict[str, Any]:
        """Host copies of every state tensor (`"<param>/<slot>"`), the rules and the update count."""
        arrays = {
            f"{name}/{slot}": self.xp.to_host(a)
            for name, slots in self.state.items()
            for slot, a in slots.items()
        }
        return {"t": self.t, "rules": dict(self.rules), "arrays": arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rules"] != self.rules:
            names = set(state["rules"]) | set(self.rules)
            changed = sorted(k for k in names if state["rules"].get(k) != self.rules.get(k))
            raise ValueError(
                f"optimizer state does not match this optimizer (rules differ for {changed[:5]})"
            )
        for name, slots in self.state.items():
            for slot, a in slots.items():
                host = state["arrays"][f"{name}/{slot}"]
                if tuple(host.shape) != tuple(a.shape):
                    raise ValueError(f"optimizer state {name}/{slot}: shape {host.shape} != {tuple(a.shape)}")
                slots[slot] = self.xp.asarray(host, host.dtype)
        self.t = int(state["t"])
