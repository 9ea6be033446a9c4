"""Deterministic optimizers over the flattened trainable vector, shared by the server and the clients.

A client that catches up by replaying the server's updates runs this same code on the same inputs
(the gradient rebuilt from (seed, coefficient) pairs), so it lands on bit-identical parameters. The
model version counts the steps taken, which is all the schedule needs.

- ``sgd``:  buf <- mu buf + g;  theta <- theta - lr_t * s * buf  (buf = g when mu = 0)
- ``adam``: m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
            theta <- theta - lr_t * s * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)

``s`` is the per-element learning-rate scale of the parameter groups (config ``optimizer.groups``).
lr_t follows the schedule over ``total_steps``: constant, linear decay to 0, or cosine, after
``warmup`` steps of linear warm-up.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["FlatOptimizer", "learning_rate"]


def learning_rate(base: float, schedule: str, step: int, total_steps: int, warmup: int = 0) -> float:
    """lr of step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    span = max(1, total_steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return base * (1.0 - frac)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


class FlatOptimizer:
    """One optimizer over a (numel,) float32 parameter vector; state is plain tensors.

    Args:
        kind: "sgd" or "adam".
        lr_scale: (numel,) float32 per-element learning-rate multipliers (or None for 1).
    """

    def __init__(self, kind: str, numel: int, lr: float, schedule: str = "constant", total_steps: int = 1,
                 warmup: int = 0, momentum: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 lr_scale: torch.Tensor | None = None):
        if kind not in ("sgd", "adam"):
            raise ValueError(f"optimizer kind must be sgd or adam, got {kind!r}")
        self.kind, self.numel, self.lr, self.schedule = kind, numel, float(lr), schedule
        self.total_steps, self.warmup, self.momentum = int(total_steps), int(warmup), float(momentum)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.lr_scale = None if lr_scale is None else lr_scale.to(torch.float32).clone()
        if self.lr_scale is not None and self.lr_scale.shape != (numel,):
            raise ValueError(f"lr_scale must have shape ({numel},), got {tuple(self.lr_scale.shape)}")
        self.reset()

    def reset(self):
        n = self.numel
        if self.kind == "adam":
            self.m, self.v = torch.zeros(n), torch.zeros(n)
        else:
            self.buf = torch.zeros(n) if self.momentum > 0 else None

    def lr_at(self, step: int) -> float:
        return learning_rate(self.lr, self.schedule, step, self.total_steps, self.warmup)

    @torch.no_grad()
    def step(self, theta: torch.Tensor, grad: torch.Tensor, step: int) -> None:
        """theta (numel,) float32 updated in place from grad (numel,) at step index ``step`` (0-based)."""
        lr = self.lr_at(step)
        if self.kind == "sgd":
            d = grad
            if self.buf is not None:
                self.buf.mul_(self.momentum).add_(grad)
                d = self.buf
        else:
            b1, b2 = self.betas
            t = step + 1
            self.m.mul_(b1).add_(grad, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            d = (self.m / (1 - b1 ** t)) / ((self.v / (1 - b2 ** t)).sqrt_().add_(self.eps))
        if self.lr_scale is not None:
            d = d * self.lr_scale
        theta.add_(d, alpha=-lr)

    def state(self) -> np.ndarray:
        """The state as one float32 array (empty for plain SGD): what a download carries."""
        if self.kind == "adam":
            return torch.cat([self.m, self.v]).numpy().copy()
        return np.zeros(0, np.float32) if self.buf is None else self.buf.numpy().copy()

    def load_state(self, arr) -> None:
        a = torch.as_tensor(np.asarray(arr, np.float32)).clone()
        want = {"adam": 2 * self.numel}.get(self.kind, self.numel if self.momentum > 0 else 0)
        if a.numel() != want:
            raise ValueError(f"optimizer state has {a.numel()} values, expected {want} ({self.kind})")
        if self.kind == "adam":
            self.m, self.v = a[:self.numel].clone(), a[self.numel:].clone()
        elif want:
            self.buf = a
