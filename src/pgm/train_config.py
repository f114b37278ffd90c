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
    # ddp: every process holds the whole model (DistributedDataParallel); fsdp: FSDP2, each block's
    # parameters, gradients and optimizer state sharded over the processes, checkpoints sharded too
    parallel: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # How a PGM's training view runs its attention (pgm.models.layers.training_attention): dense
    # masked SDPA, grouped (a loop over rows and groups) or jagged (one nested-tensor call, for GPUs)
    attention: Literal["dense", "grouped", "jagged"] = "dense"
    # Start from released or earlier weights (weights only: optimizer, schedule and step start fresh):
    # anything pgm.load opens (a run, a pretrained directory, an authors' checkpoint, a Hub id)
    init_from: str = ""
    init_weights: Literal["auto", "ema", "raw"] = "auto"  # auto: the weights the source samples with
    init_resize_vocab: bool = False  # a larger vocabulary than the source's: new rows from the mean embedding
    # Where the run is followed live besides metrics.jsonl (rank 0 only): none, tensorboard or wandb
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    log_samples: int = 4  # decoded samples (text) or grid images logged at each validation (0: none)

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
        require(self.log_samples >= 0, f"log_samples must be non-negative, got {self.log_samples}")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then constant or cosine down to min_lr_ratio * lr."""
        import math

        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclasses.dataclass
class DistillConfig(Config):
    """The `distill` section of a distillation run (`pgm distill`): multi-round SDTT.

    Round r's teacher samples in start_steps / n^r steps (n = num_distill_steps) and its student
    learns to take each n of those steps in one; after the round the student becomes the teacher.
    The rounds continue until the student samples in end_steps steps (the authors: 1024 -> 32, five
    rounds of 10k steps)."""

    teacher: str = ""  # the first teacher: a run or pretrained directory, or an authors' checkpoint (text)
    # Of the first teacher: "auto" for what its samplers use (a run's average when it kept one, a
    # pretrained directory's only set); the authors distil the raw weights.
    teacher_weights: Literal["auto", "ema", "raw"] = "auto"
    start_steps: int = 1024  # the first teacher's sampling steps
    end_steps: int = 32  # the last student's sampling steps
    num_distill_steps: int = 2  # teacher steps per student step
    round_steps: int = 10_000  # optimisation steps per round
    divergence: Literal["kl-bwd", "kl-fwd", "tv", "mse"] = "kl-bwd"
    grow_from: Literal["raw", "ema"] = "raw"  # the student's weights that become the next teacher (the authors': raw)

    def validate(self) -> None:
        n = self.num_distill_steps
        require(n >= 2, f"num_distill_steps must be at least 2 (a round divides the sampling steps by it), got {n}")
        require(self.round_steps >= 1, f"round_steps must be positive, got {self.round_steps}")
        require(self.end_steps >= 1 and self.start_steps > self.end_steps,
                f"start_steps ({self.start_steps}) must exceed end_steps ({self.end_steps}) >= 1")
        require(self.end_steps * n ** self.rounds == self.start_steps,
                f"start_steps ({self.start_steps}) must be end_steps ({self.end_steps}) times a power of "
                f"num_distill_steps ({n}): each round divides the steps by {n}")

    @property
    def rounds(self) -> int:
        count, steps = 0, self.start_steps
        while steps > self.end_steps and steps % self.num_distill_steps == 0:
            steps //= self.num_distill_steps
            count += 1
        return count

    @property
    def total_steps(self) -> int:
        return self.rounds * self.round_steps

    def round_of(self, step: int) -> int:
        """The round (0-based) that optimisation step `step` (0-based) belongs to."""
        return min(step // self.round_steps, self.rounds - 1)

    def teacher_steps(self, round_: int) -> int:
        return self.start_steps // self.num_distill_steps ** round_

    def student_steps(self, round_: int) -> int:
        return self.teacher_steps(round_) // self.num_distill_steps
