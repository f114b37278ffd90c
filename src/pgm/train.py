"""One training loop for every model kind, on one process or many (`torchrun`).

Reproducibility is by construction: the rows of step s come from a permutation seeded by
(seed, epoch), the loss noise (times, partitions) of step s from a generator seeded by
(seed, step) and drawn for the whole global batch, and dropout from a seed of (seed, step,
rank). Resuming from a checkpoint therefore replays exactly the steps an uninterrupted run
would have taken, and N processes compute what one process computes for the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import DATA_DIR, PreparedData, load_prepared, prepare_data
from .eval.perplexity import seed_for, validation_elbo
from .models import build_model, is_image_model
from .objectives import objective_for
from .objectives.image import psnr
from .runs import (CONFIG_FILE, RunConfig, RunError, latest_checkpoint, load_checkpoint, read_run_config,
                   remove_partial_checkpoints, save_checkpoint, write_atomic)

RESUMABLE_FIELDS = {"max_steps", "eval_every", "eval_rows", "save_every", "keep_checkpoints", "log_every", "progress",
                    "device"}


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = Distributed(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("train.device asks for CUDA but no GPU is available")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # torch.distributed.nn binds group.WORLD into default arguments when it is first imported, and DDP imports
        # it. Imported after the group exists, it would keep the group alive past destroy_process_group: gloo's
        # worker threads then outlive the interpreter, and one releasing a tensor at exit aborts the process.
        import torch.distributed.nn as _  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


class EMA:
    """Float32 exponential moving average of the parameters, warmed up as min(decay, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters() if p.requires_grad]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1 - decay)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state (buffers included) with the averaged parameters."""
        state = dict(model.state_dict())
        state.update(zip(self.names, self.shadow))
        return state

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.shadow = [state[name].float().clone().to(s.device) for name, s in zip(self.names, self.shadow)]
        self.updates = updates

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily put the averaged weights into `model`."""
        params = [p for p in model.parameters() if p.requires_grad]
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)


class RowSchedule:
    """Which data rows each step uses: consecutive slices of per-epoch permutations."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self._epoch, self._order = -1, None

    def rows(self, step: int, batch_size: int) -> np.ndarray:
        out = []
        for index in range(step * batch_size, (step + 1) * batch_size):
            epoch, position = divmod(index, self.num_rows)
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            out.append(self._order[position])
        return np.asarray(out)


def resolve_config(config: RunConfig, data: PreparedData) -> RunConfig:
    """Fill in what the data decides: the vocabulary, the mask id and, for images, the row shape."""
    tokenizer, model = data.tokenizer, config.model
    kind = model.kind
    if kind == "vq":
        if getattr(tokenizer, "kind", "") != "pixels":
            raise RunError("a VQ autoencoder trains on pixels: set data.tokenizer=pixels")
        if (model.in_channels, model.image_size) != (tokenizer.channels, tokenizer.image_size):
            raise RunError(f"the VQ model reads {model.in_channels}x{model.image_size}px images but the data holds "
                           f"{tokenizer.channels}x{tokenizer.image_size}px images")
        return config
    image_tokens = getattr(tokenizer, "kind", "") == "vq"
    if is_image_model(model):
        if not image_tokens:
            raise RunError(f"a class-conditional {kind} model trains on VQ tokens: set data.tokenizer=vq:VQ_RUN_DIR")
        classes = len(data.meta.get("classes", []))
        if model.num_classes < classes:
            raise RunError(f"the data has {classes} classes but the model only {model.num_classes}")
        if kind == "maskgit":
            model = model.replace(codebook_size=tokenizer.codebook_size, grid_size=tokenizer.grid_size)
        else:
            model = model.replace(vocab_size=tokenizer.model_vocab_size, mask_token_id=tokenizer.mask_id,
                                  length=tokenizer.row_length)
        return dataclasses.replace(config, model=model)
    if image_tokens or tokenizer.kind == "pixels":
        raise RunError(f"a {kind} model is a text model; image data needs a vq, maskgit or class-conditional pgm model")
    model = model.replace(vocab_size=tokenizer.model_vocab_size, mask_token_id=tokenizer.mask_id)
    return dataclasses.replace(config, model=model)


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Forget what a crashed run logged after its last checkpoint."""
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            write_atomic(self.path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_nll"]) for r in records if "val_nll" in r]
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="training loss", alpha=0.7)
    if val:
        axis.plot(*zip(*val), "o-", label="validation ELBO")
    axis.set_xlabel("step")
    axis.set_ylabel("nats / token")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def _prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool, info: Distributed, log) -> RunConfig:
    """Create or reopen the run directory; return the configuration to train with."""
    if resume:
        saved = read_run_config(run_dir)
        changed = [f"{section}.{k}" for section in RunConfig.SECTIONS
                   for k, v in getattr(config, section).to_dict().items()
                   if getattr(saved, section).to_dict().get(k) != v
                   and not (section == "train" and k in RESUMABLE_FIELDS)
                   and not (section == "model" and k in ("vocab_size", "mask_token_id"))]
        if changed:
            raise RunError(f"cannot change {', '.join(changed)} when resuming; start a new run instead")
        train = dataclasses.replace(saved.train, **{k: getattr(config.train, k) for k in RESUMABLE_FIELDS})
        return dataclasses.replace(saved, train=train)
    if (run_dir / CONFIG_FILE).exists() and latest_checkpoint(run_dir) is not None:
        raise RunError(f"{run_dir} already holds a trained run; pass --resume to continue it or choose another --out")
    return config


def train(config: RunConfig, run_dir: Path, *, resume: bool = False, log=print) -> Path:
    """Train the model described by `config` into `run_dir`; returns the run directory."""
    info, device = setup_distributed(config.train.device)
    run_dir = Path(run_dir)
    if not info.main:
        log = lambda *args, **kwargs: None  # noqa: E731 - one voice per run
    try:
        config = _prepare_run_dir(config, run_dir, resume, info, log)
        return _train(config, run_dir, info, device, log)
    finally:
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: RunConfig, run_dir: Path, info: Distributed, device: torch.device, log) -> Path:
    tc = config.train
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        recipe = {"data": config.data.to_dict(), "length": config.model.length}
        meta_path = run_dir / DATA_DIR / "meta.json"
        if not meta_path.is_file() or json.loads(meta_path.read_text()).get("recipe") != recipe:
            prepare_data(config.data, config.model.length, run_dir, log=log)
    info.barrier()
    data = load_prepared(run_dir)
    config = resolve_config(config, data)
    if info.main:
        write_atomic(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2).encode())

    per_process, remainder = divmod(tc.batch_size, info.world_size)
    micro = tc.micro_batch_size or per_process
    if remainder or per_process % micro:
        raise RunError(f"batch_size {tc.batch_size} must split evenly into {info.world_size} process(es) "
                       f"x micro-batches of {micro}")
    accumulation = per_process // micro
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    torch.manual_seed(tc.seed)
    model = build_model(config.model).to(device)
    objective = objective_for(model, complement=tc.complement, label_dropout=tc.label_dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  weight_decay=tc.weight_decay, foreach=True)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    metrics = MetricsLog(run_dir / "metrics.jsonl", info.main)

    step = 0
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        step = loaded["state"]["step"]
        if ema is not None and loaded["ema"] is not None:
            ema.load(loaded["ema"], loaded["state"].get("ema_updates", step))
        log(f"resuming {run_dir} from step {step}")
    metrics.truncate_after(step)
    if step >= tc.max_steps:
        log(f"{run_dir} has already trained {step} of {tc.max_steps} steps")
        return run_dir

    parameters = model.num_parameters()
    log(f"model: {config.model.kind}, {parameters / 1e6:.2f}M parameters; {info.world_size} process(es) on {device}"
        f" ({'bf16 autocast' if bf16 else 'fp32'}); global batch {tc.batch_size} x {config.model.length} tokens"
        f" = {accumulation} micro-batch(es) of {micro} per process")
    network = model
    if info.world_size > 1:
        network = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    schedule = RowSchedule(len(data.train), tc.seed)
    length = config.model.length
    eval_indices = _evaluation_rows(len(data.val), tc.eval_rows)

    def save():
        if info.main:
            state = {"step": step, "ema_updates": ema.updates if ema else 0, "parameters": parameters}
            averaged = model.savable_state(ema.state_dict(model)) if ema else None
            save_checkpoint(run_dir, step, model.savable_state(), averaged, optimizer.state_dict(), state,
                            tc.keep_checkpoints)
        info.barrier()

    def evaluate():
        with ema.applied(model) if ema else contextlib.nullcontext():
            result = validation_elbo(model, objective, data.val, indices=eval_indices, batch_size=tc.batch_size,
                                     micro_batch_size=micro, seed=tc.seed, device=device, autocast=autocast(),
                                     bos_always_clean=tc.bos_always_clean, rank=info.rank,
                                     world_size=info.world_size)
        metrics.write({"step": step, "val_nll": result.nll, "val_ppl": result.perplexity})
        return result

    progress = None
    if info.main and tc.progress:
        from tqdm import tqdm

        progress = tqdm(total=tc.max_steps, initial=step, unit="step", dynamic_ncols=True)
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    last_val = None
    model.train()
    try:
        while step < tc.max_steps:
            lr = tc.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = schedule.rows(step, tc.batch_size)
            noise = objective.draw_noise(tc.batch_size, length, generator=torch.Generator().manual_seed(
                seed_for(tc.seed, step)))
            torch.manual_seed(seed_for(tc.seed, step, info.rank, 1))  # dropout
            step_loss = torch.zeros((), device=device)
            for m in range(accumulation):
                start = info.rank * per_process + m * micro
                tokens, valid = data.train[rows[start:start + micro]]
                labels = data.train.labels_of(rows[start:start + micro])
                labeled = {} if labels is None else {"labels": labels.to(device)}
                tokens = tokens.to(device, non_blocking=True)
                valid = None if valid is None else valid.to(device)
                always_clean = None
                if tc.bos_always_clean:
                    always_clean = torch.zeros_like(tokens, dtype=torch.bool)
                    always_clean[:, 0] = True
                sync = m == accumulation - 1 or info.world_size == 1
                with (contextlib.nullcontext() if sync else network.no_sync()), autocast():
                    out = objective.loss(network, tokens, valid=valid, always_clean=always_clean,
                                         noise=None if noise is None else noise[start:start + micro].to(device),
                                         **labeled)
                    (out.loss / accumulation).backward()
                step_loss += out.loss.detach() / accumulation
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            if info.world_size > 1:
                dist.all_reduce(step_loss)
                step_loss /= info.world_size
            window_loss += float(step_loss)
            window_tokens += tc.batch_size * length
            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = time.perf_counter() - window_start
                steps_in_window = (step - 1) % tc.log_every + 1
                record = {"step": step, "loss": window_loss / steps_in_window, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_s": window_tokens / elapsed}
                metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                         **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            final = step == tc.max_steps
            if (tc.eval_every and step % tc.eval_every == 0) or final:
                last_val = evaluate().nll
                if progress is None:
                    log(f"step {step}: {_describe_validation(config.model, last_val)}")
            if (tc.save_every and step % tc.save_every == 0) or final:
                save()
                if info.main:
                    plot_losses(metrics.records(), run_dir / "loss.png", f"{config.model.kind}: {run_dir.name}")
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        if info.world_size == 1 and step > 0 and (latest_checkpoint(run_dir) is None
                                                  or not latest_checkpoint(run_dir).name.endswith(f"{step:07d}")):
            save()
            log(f"interrupted: saved step {step}; continue with `pgm train --out {run_dir} --resume`")
        raise
    if progress is not None:
        progress.close()
    log(f"done: {step} steps; {_describe_validation(config.model, last_val)}; run saved in {run_dir}")
    return run_dir


def _describe_validation(model_config, nll: float) -> str:
    kind = model_config.kind
    if kind == "ar":
        return f"validation NLL {nll:.4f} nats/token (perplexity {math.exp(nll):.1f})"
    if kind == "vq":
        return f"validation MSE {nll:.5f} per pixel on [-1, 1] (PSNR {psnr(nll):.2f} dB)"
    if is_image_model(model_config):
        return f"validation cross-entropy {nll:.4f} nats/token"
    return f"validation ELBO {nll:.4f} nats/token (perplexity <= {math.exp(nll):.1f})"


def _evaluation_rows(num_rows: int, wanted: int) -> list[int]:
    """`wanted` validation rows spread evenly over the split (all when wanted is 0 or too large)."""
    if wanted == 0 or wanted >= num_rows:
        return list(range(num_rows))
    return np.linspace(0, num_rows - 1, wanted).round().astype(int).tolist()
