"""The `train` section of a run's configuration."""

from __future__ import annotations

import dataclasses
from typing import Literal

from .config import Config, require


@dataclasses.dataclass
class TrainConfig(Config):
    batch_size: int = 32  # rows per optimizer step, over all processes
    micro_batch_size: int = 0  # rows per forward pass on one process (0: batch_size / processes)
    max_steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.1  # cosine floor, as a share of lr
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0: off
    ema: float = 0.9999  # decay of the weight average (0: off); warmed up as min(ema, (1+n)/(10+n))
    eval_every: int = 200  # steps between validation ELBOs (0: only at the end)
    eval_rows: int = 256  # validation rows per periodic evaluation (0: all)
    save_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    bos_always_clean: bool = True  # the BOS at position 0 is given, never masked or scored
    complement: Literal["exact", "one_minus_t"] = "exact"  # PGM: the swapped view's time
    label_dropout: float = 0.1  # class-conditional models: share of rows trained with the null class
    progress: bool = True  # a progress bar on the terminal

    def validate(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}")
        require(self.micro_batch_size >= 0, f"micro_batch_size must be non-negative, got {self.micro_batch_size}")
        require(self.max_steps >= 1, f"max_steps must be positive, got {self.max_steps}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.warmup_steps >= 0, f"warmup_steps must be non-negative, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        require(0 <= self.ema < 1, f"ema must lie in [0, 1), got {self.ema}")
        require(self.grad_clip >= 0, f"grad_clip must be non-negative, got {self.grad_clip}")
        require(min(self.eval_every, self.eval_rows, self.save_every) >= 0,
                "eval_every, eval_rows and save_every must be non-negative")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        require(0 <= self.label_dropout < 1, f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        require(self.log_every >= 1, f"log_every must be positive, got {self.log_every}")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then constant or cosine down to min_lr_ratio * lr."""
        import math

        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
