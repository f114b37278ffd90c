"""One training loop for every model kind, on one process or many (`torchrun`).

Reproducibility is by construction: the rows of step s come from a permutation seeded by
(seed, epoch), the loss noise (times, partitions) of step s from a generator seeded by
(seed, step) and drawn for the whole global batch, and dropout from a seed of (seed, step,
rank). Resuming from a checkpoint therefore replays exactly the steps an uninterrupted run
would have taken, and N processes compute what one process computes for the same global batch.

`train` runs a `Trainer` through its named steps: open the run directory, prepare the data,
build the model and its optimizer, resume from the last checkpoint, then optimisation steps
with periodic validation and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import (PreparedData, check_prepared, data_directory, load_prepared, load_tokenizer, prepare_data,
                   prepared_recipe, same_recipe)
from .data.config import TOKENIZER_FIELDS
from .devices import autocast, describe_precision, process_device, uses_bf16
from .errors import ResourceError, RunError
from .eval.image_metrics import psnr
from .eval.perplexity import seed_for, validation_elbo
from .formats import (CONFIG_FILE, DATA_DIR, TOKENIZER_DIR, copy_directory, make_directory, out_of_space,
                      remove_partial, replaced_atomically, write_json)
from .initial_weights import FROM_SOURCE, InitialModel, load_initial_state, open_initial_model, starting_settings
from .models import build_model, is_image_model
from .models.layers import training_attention
from .objectives import objective_for
from .objectives.losses import always_clean_mask
from .presets import vq_preset_for
from .runs import (METRICS_FILE, MetricsLog, RunConfig, checkpoint_step, fallback, is_sharded, latest_checkpoint,
                   load_checkpoint, read_checkpoint_state, read_run_config, remove_partial_checkpoints, save_checkpoint,
                   save_sharded_checkpoint, validation_metric)
from .sharding import SHARDED_DIR, checkpoint_activations, distribute_whole, load_shards, save_shards, shard
from .tracking import SampleLogger, tracker_for
from .vq_tokenizer import vq_tokenizer_for_data

RESUMABLE_FIELDS = {"max_steps", "eval_every", "eval_rows", "save_every", "keep_checkpoints", "log_every", "progress",
                    "device", "parallel", "activation_checkpointing", "attention", "logger", "log_samples"}


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.local_world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def launched_as() -> Distributed:
    """This process's place in the run, as torchrun's environment says (no process group needed)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Distributed(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")),
                       int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def setup_distributed(device_name: str, group_of_one: bool = False) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU); a lone
    process makes a group of its own with `group_of_one` (FSDP needs one)."""
    info = launched_as()
    world_size = info.world_size
    device = process_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world_size > 1 or group_of_one) and not dist.is_initialized():
        # torch.distributed.nn binds group.WORLD into default arguments when it is first imported, and DDP imports
        # it. Imported after the group exists, it would keep the group alive past destroy_process_group: gloo's
        # worker threads then outlive the interpreter, and one releasing a tensor at exit aborts the process.
        import torch.distributed.nn as _  # noqa: F401
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size > 1:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return info, device


def leave_distributed(synchronise: bool = True) -> None:
    """Leave the process group so that its worker threads are joined while they are idle.

    gloo's destructor joins its worker threads holding the GIL, and a worker dropping the last
    reference to a finished collective needs the GIL to release the tensors' Python objects: if
    the group goes while a worker is still at that, the process hangs (seen in CI; the 2-process
    test, 1 run in 40 on a loaded machine). So the last collective's handle stays here until the
    group is gone, and a pause without the GIL lets the workers finish releasing the ones before
    it. A failed process (`synchronise` false) skips the barrier: its peers may never reach one."""
    last = dist.barrier(async_op=True) if synchronise else None
    if last is not None:
        last.wait()
        time.sleep(0.1)
    dist.destroy_process_group()
    del last


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

    def averaged(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its average (sharded like the parameter under FSDP)."""
        return dict(zip(self.names, self.shadow))

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state (buffers included) with the averaged parameters."""
        return {**model.state_dict(), **self.averaged()}

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


def plot_losses(records: list[dict], path: Path, title: str, validation_key: str = "val_nll") -> None:
    """The training loss (one line per round of a distillation) and the validation number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [(r["step"], r[validation_key]) for r in records if validation_key in r]
    figure, axis = plt.subplots(figsize=(7, 4))
    for round_ in dict.fromkeys(r.get("round") for r in train):
        members = [r for r in train if r.get("round") == round_]
        label = "training loss" if round_ is None else f"round {round_}: {members[0]['student_steps']}-step student"
        axis.plot([r["step"] for r in members], [r["loss"] for r in members], label=label, alpha=0.7)
    if val:
        axis.plot(*zip(*val), "o-", label={"val_nll": "validation ELBO"}.get(validation_key, validation_key))
    axis.set_xlabel("step")
    axis.set_ylabel("nats / token")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with replaced_atomically(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)


def open_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> RunConfig:
    """Check the run directory against what was asked; return the configuration to train with
    (a resumed run keeps its saved recipe; only RESUMABLE_FIELDS may change)."""
    if resume:
        saved = read_run_config(run_dir)
        if saved.data.tokenizer == FROM_SOURCE and config.data.tokenizer == "bpe":  # what starting replaced
            config = dataclasses.replace(config, data=config.data.replace(tokenizer=FROM_SOURCE))
        if saved.sections != config.sections:
            raise RunError(f"{run_dir} holds a run of sections {', '.join(saved.sections)}, not "
                           f"{', '.join(config.sections)}: start a new run instead")
        changed = [f"{section}.{k}" for section in config.sections
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
    if config.distill is not None:
        raise RunError("a configuration with a distill section is a distillation, run by pgm distill (pgm distill "
                       f"--resume --out {run_dir} continues one), not pgm train")
    return run_trainer(Trainer, config, run_dir, resume=resume, log=log)


def run_trainer(trainer_class, config: RunConfig, run_dir: Path, *, resume: bool, log, **options) -> Path:
    """Run a `Trainer` (or subclass, built with `options`) in this process's place in the run."""
    given_a_group = dist.is_initialized()  # a group this run makes is one it leaves
    joined = False
    info, run_dir = launched_as(), Path(run_dir)
    if not info.main:
        log = lambda *args, **kwargs: None  # noqa: E731 - one voice per run
    trainer, finished = None, False
    try:
        trainer = trainer_class(open_run_dir(config, run_dir, resume), run_dir, info, log, **options)
        # The data first, before any collective: preparing a corpus may take longer than a
        # collective's timeout, so the other processes wait for its files instead (`wait_for_data`).
        trainer.prepare_data()
        settings = trainer.config.train
        info, trainer.device = setup_distributed(settings.device, group_of_one=settings.parallel == "fsdp")
        joined = not given_a_group and dist.is_initialized()
        trainer.build()
        trainer.resume()
        with training_attention(trainer.config.train.attention):
            trainer.run()
        finished = True
        return run_dir
    finally:
        if trainer is not None:
            trainer.tracker.close(failed=not finished)
            trainer.__dict__.clear()  # what holds the process group (DDP's reducer) goes before the group
        if joined:
            leave_distributed(finished)


class Trainer:
    """One training run, in the steps `train` takes them."""

    VALIDATION_KEY = "val_nll"  # the validation record's number that the progress bar shows
    RESUME_COMMAND = "pgm train"

    def __init__(self, config: RunConfig, run_dir: Path, info: Distributed, log):
        self.config, self.run_dir, self.info, self.log = config, run_dir, info, log
        self.device: torch.device | None = None  # once the process has joined the run
        self.step = 0
        self.metrics = MetricsLog(run_dir / METRICS_FILE, info.main)
        self.tracker = tracker_for(config.train, info.main)  # here, so that a missing package stops the run at once
        self.log_samples = SampleLogger(self.tracker, config.train.log_samples, config.train.seed)
        self.seconds_before, self.started = 0.0, time.monotonic()  # the run's own clock (`elapsed`)
        self.initial: InitialModel | None = None  # the model of train.init_from, for a run not yet started

    # --- set-up -------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """The run's data: the data directory it names (`data.prepared`, used in place, its
        tokenizer copied into the run) or its own, tokenized and packed into the run directory
        once per recipe by the first process while the others wait for it; then fill in the
        configuration what the data decides and save it."""
        config, run_dir = self.config, self.run_dir
        tc = config.train
        if config.data.tokenizer == FROM_SOURCE and not tc.init_from:
            raise RunError("data.tokenizer=init_from encodes with the tokenizer of train.init_from, which is not set")
        if tc.init_from and latest_checkpoint(run_dir) is None:  # checked before any work on the data
            self.initial = open_initial_model(tc.init_from, tc.init_weights, config.data)
            data, model = starting_settings(config.data, config.model, self.initial, tc.init_resize_vocab, self.log)
            self.config = config = dataclasses.replace(config, data=data, model=model)
        recipe = config.data.recipe(config.model.length)
        if config.data.prepared:
            prepared = self.check_prepared(Path(config.data.prepared).expanduser())
            self.config = config = dataclasses.replace(config, data=config.data.replace(prepared=str(prepared)))
        elif self.info.nodes > 1 and not same_recipe(prepared_recipe(run_dir), recipe):
            # A failed preparation stops the processes of its own node only: the others would wait forever.
            raise RunError("a run over several nodes needs its data prepared beforehand: text with pgm prepare and "
                           "data.prepared=DIR; images by starting the run on one node, then --resume on several")
        if self.info.main:
            existed = {path: path.exists() for path in (run_dir, run_dir / TOKENIZER_DIR, run_dir / DATA_DIR)}
            make_directory(run_dir)
            remove_partial(run_dir)  # what a killed data step left (a hidden tokenizer directory)
            remove_partial_checkpoints(run_dir)
            try:
                if config.data.prepared:
                    self.take_prepared(Path(config.data.prepared))
                elif not same_recipe(prepared_recipe(run_dir), recipe):
                    self.write_data(recipe)
            except ValueError:  # a mistake in the data: nothing half-made is left (an interrupt keeps what is done)
                _remove_created(existed)
                raise
        elif not config.data.prepared:
            wait_for_data(run_dir, recipe)
        self.data = load_prepared(data_directory(run_dir, config.data))
        self.config = self.resolved_config()
        if self.info.main:
            write_json(run_dir / CONFIG_FILE, self.config.to_dict())

    def write_data(self, recipe: dict) -> None:
        """Prepare the data of `recipe` (this run's) into the run directory."""
        config, given = self.config, self.given_tokenizer()
        prepare_data(config.data, config.model.length, self.run_dir, log=self.log, image_encoder=self._image_encoder(),
                     tokenizer=None if given is None else given[0], progress=config.train.progress)

    def check_prepared(self, directory: Path) -> Path:
        """The data directory `data.prepared` names, finished and of this run's recipe; with a
        tokenizer given from elsewhere (`given_tokenizer`), of the recipe apart from the tokenizer
        settings, which that tokenizer decides, and encoded with it."""
        data, given = self.config.data, self.given_tokenizer()
        if given is None:
            return check_prepared(directory, data, self.config.model.length)
        tokenizer, whose = given
        found = (prepared_recipe(directory) or {}).get("data", {})
        data = data.replace(**{field: found.get(field, getattr(data, field)) for field in TOKENIZER_FIELDS})
        directory = check_prepared(directory, data, self.config.model.length)
        if load_tokenizer(directory / TOKENIZER_DIR).identity() != tokenizer.identity():
            raise RunError(f"data.prepared={directory} was encoded with another tokenizer than {whose}")
        return directory

    def given_tokenizer(self):
        """(the tokenizer the data is encoded with instead of the one data.tokenizer describes, whose
        it is), or None: with data.tokenizer=init_from, that of the model the run started from."""
        if self.config.data.tokenizer != FROM_SOURCE:
            return None
        tokenizer = self.initial.tokenizer if self.initial else load_tokenizer(self.run_dir / TOKENIZER_DIR)
        return tokenizer, f"that of train.init_from={self.config.train.init_from}"

    def take_prepared(self, directory: Path) -> None:
        """Use a prepared data directory: its tokenizer copied into the run (a run samples and
        publishes without it; a copy every time, over whatever an earlier attempt left there), its
        rows where they are."""
        copy_directory(directory / TOKENIZER_DIR, self.run_dir / TOKENIZER_DIR)

    def resolved_config(self) -> RunConfig:
        """The configuration with what the prepared data decides filled in (a run on init_from's
        tokenizer keeps init_from's vocabulary, which the tokenizer's ids fit in)."""
        if self.config.data.tokenizer == FROM_SOURCE:
            return self.config
        return resolve_config(self.config, self.data)

    def _image_encoder(self):
        data = self.config.data
        if not data.tokenizer.startswith("vq:"):
            return None
        directory = data.tokenizer[3:]
        preset = vq_preset_for(directory) or "fmnist-vq"
        return vq_tokenizer_for_data(data, f"; train it first with `pgm train --preset {preset} --out {directory}`")

    def build(self) -> None:
        """The model (seeded), its objective, the optimizer, the weight average and the batch split."""
        tc, info = self.config.train, self.info
        per_process, remainder = divmod(tc.batch_size, info.world_size)
        self.micro = tc.micro_batch_size or per_process
        if remainder or per_process % self.micro:
            raise RunError(f"batch_size {tc.batch_size} must split evenly into {info.world_size} process(es) "
                           f"x micro-batches of {self.micro}")
        self.per_process, self.accumulation = per_process, per_process // self.micro
        if tc.attention != "dense" and self.config.model.kind != "pgm":
            raise RunError(f"train.attention={tc.attention} applies to a PGM's training view; a "
                           f"{self.config.model.kind} model has one way to attend")
        torch.manual_seed(tc.seed)
        self.model = build_model(self.config.model)
        if self.initial is not None:  # before the average and the shards, which start from these weights
            load_initial_state(self.initial, self.model)
            weights = self.initial.model.origin.card.get("weights") or tc.init_weights
            self.log(f"weights from {tc.init_from} ({weights})")
            self.initial = None
        self.model = self.model.to(self.device)
        if tc.activation_checkpointing:
            checkpoint_activations(self.model)
        self.sharded = tc.parallel == "fsdp"
        if self.sharded:  # before the optimizer and the average, which then hold shards too
            shard(self.model, self.device, info.world_size, bf16_parameters=uses_bf16(self.device, tc.precision))
        self.objective = objective_for(self.model, complement=tc.complement, label_dropout=tc.label_dropout)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                           weight_decay=tc.weight_decay, foreach=True)
        self.ema = EMA(self.model, tc.ema) if tc.ema > 0 else None
        self.network = self.network_module()
        if info.world_size > 1 and not self.sharded:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.rows = RowSchedule(len(self.data.train), tc.seed)
        self.eval_indices = _evaluation_rows(len(self.data.val), tc.eval_rows)

    def network_module(self) -> torch.nn.Module:
        """What the loss calls (and DDP wraps): the model's forward."""
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.config.train.precision)

    def resume(self) -> None:
        """Continue from the latest complete checkpoint, if there is one, and forget what a crashed
        run logged after it."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            if self.sharded and is_sharded(checkpoint):
                average = self.ema.averaged() if self.ema else None
                load_shards(checkpoint / SHARDED_DIR, self.model, self.optimizer, average)
                loaded = {"state": read_checkpoint_state(checkpoint), "extra": {}}
                if self.ema is not None:
                    self.ema.updates = loaded["state"]["ema_updates"]
            else:
                loaded = load_checkpoint(checkpoint)
                self.take_whole(loaded)
            self.step = loaded["state"]["step"]
            self.seconds_before = loaded["state"].get("elapsed_s", 0.0)  # none in checkpoints older than the clock
            self.restore(loaded)
            self.log(f"resuming {self.run_dir} from step {self.step}")
        self.metrics.truncate_after(self.step if checkpoint is not None else -1)  # a new start logs step 0 anew
        self.tracker.start(self.run_dir, self.step, self.config.to_dict())

    def take_whole(self, loaded: dict) -> None:
        """Take the model, optimizer and average of an unsharded checkpoint (or a sharded one read whole)."""
        updates = loaded["state"].get("ema_updates", loaded["state"]["step"])
        if not self.sharded:
            # Files that read well but belong to another model (or optimizer) are damaged too.
            checkpoint = latest_checkpoint(self.run_dir)
            for file, take in (("model.safetensors", lambda: self.model.load_state_dict(loaded["model"])),
                               ("optimizer.pt", lambda: self.optimizer.load_state_dict(loaded["optimizer"])),
                               ("ema.safetensors", lambda: self.ema is not None and loaded["ema"] is not None
                                and self.ema.load(loaded["ema"], updates))):
                try:
                    take()
                except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
                    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()
                    raise RunError(f"{checkpoint / file} does not fit this run's model ({reason}); to resume, "
                                   f"{fallback(checkpoint, resuming=True)}") from None
            return
        if self.ema is not None and loaded["ema"] is not None:  # the average, sharded like the parameters
            distribute_whole(self.model, loaded["ema"])
            self.ema = EMA(self.model, self.config.train.ema)
            self.ema.updates = updates
        distribute_whole(self.model, loaded["model"], self.optimizer, loaded["optimizer"])

    # --- the loop -----------------------------------------------------------------------------

    def optimisation_step(self) -> tuple[float, float, float]:
        """One optimizer step over the global batch of the current step, in micro-batches;
        returns (loss averaged over the processes, gradient norm, learning rate)."""
        tc, info, step = self.config.train, self.info, self.step
        lr = tc.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = self.rows.rows(step, tc.batch_size)
        noise = self.step_noise(rows, torch.Generator().manual_seed(seed_for(tc.seed, step)))
        torch.manual_seed(seed_for(tc.seed, step, info.rank, 1))  # dropout
        step_loss = torch.zeros((), device=self.device)
        for m in range(self.accumulation):
            start = info.rank * self.per_process + m * self.micro
            part = rows[start:start + self.micro]
            tokens, valid = self.data.train[part]
            labels, given = self.data.train.labels_of(part), self.data.train.given_of(part)
            labeled = {} if labels is None else {"labels": labels.to(self.device)}
            if given is not None:  # pairs: the EOS that fill a row are learned too (where an answer ends)
                labeled["given"], valid = given.to(self.device), None
            tokens = tokens.to(self.device, non_blocking=True)
            valid = None if valid is None else valid.to(self.device)
            sync = m == self.accumulation - 1 or info.world_size == 1
            with self.gradient_sync(sync), self.autocast():
                loss = self.batch_loss(tokens, valid, None if noise is None else noise[start:start + self.micro].to(
                    self.device), **labeled)
                loss.backward()
            step_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip if tc.grad_clip else math.inf)
        if self.sharded:  # a DTensor over the processes
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        if info.world_size > 1:
            dist.all_reduce(step_loss)
            step_loss /= info.world_size
        return float(step_loss), float(grad_norm), lr

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Whether this micro-batch's backward reduces the gradients over the processes (the last
        of a step does; the others accumulate locally)."""
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.network.no_sync()

    def step_noise(self, rows: np.ndarray, generator: torch.Generator):
        """The loss noise of the whole global batch of this step (its `rows`)."""
        return self.objective.draw_noise(len(rows), self.config.model.length, generator=generator)

    def batch_loss(self, tokens: torch.Tensor, valid: torch.Tensor | None, noise, given: torch.Tensor | None = None,
                   **labeled) -> torch.Tensor:
        """What one micro-batch backpropagates: its share of this process's loss, so that the
        micro-batches of a step add up to the mean loss of the process's rows. `given`: the
        leading tokens each row is given (pairs: BOS and prompt)."""
        out = self.objective.loss(self.network, tokens, valid=valid, always_clean=self._always_clean(tokens, given),
                                  noise=noise, **labeled)
        return out.loss / self.accumulation

    def _always_clean(self, tokens: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor | None:
        return always_clean_mask(tokens, given, self.config.train.bos_always_clean)

    def validate(self) -> float:
        """Validation of the averaged weights on the evaluation rows, logged; returns the number
        the progress bar shows."""
        with self.ema.applied(self.model) if self.ema else contextlib.nullcontext():
            record = {"step": self.step, **self.validation_record()}
            self.log_samples(self.model, self.data, self.config.data, self.step, self.device)
        self.write_record(record)
        return record[self.VALIDATION_KEY]

    def validation_record(self) -> dict:
        """The validation ELBO (or loss) of the model as it is."""
        tc = self.config.train
        result = validation_elbo(self.model, self.objective, self.data.val, indices=self.eval_indices,
                                 batch_size=tc.batch_size, micro_batch_size=self.micro, seed=tc.seed,
                                 device=self.device, autocast=self.autocast, bos_always_clean=tc.bos_always_clean,
                                 rank=self.info.rank, world_size=self.info.world_size, lockstep=self.sharded)
        return {"val_nll": result.nll, "val_ppl": result.perplexity}

    def save(self) -> None:
        """A checkpoint of this step (from the main process, or every process's shards), and the
        loss plot."""
        model, ema, tc = self.model, self.ema, self.config.train
        state = {"step": self.step, "ema_updates": ema.updates if ema else 0, "parameters": model.num_parameters(),
                 "elapsed_s": round(self.elapsed(), 3), **self.checkpoint_state()}
        try:
            if self.sharded:
                average = ema.averaged() if ema else None
                save_sharded_checkpoint(self.run_dir, self.step,
                                        lambda directory: save_shards(directory, model, self.optimizer, average),
                                        state, tc.keep_checkpoints)
            elif self.info.main:
                averaged = model.savable_state(ema.state_dict(model)) if ema else None
                save_checkpoint(self.run_dir, self.step, model.savable_state(), averaged, self.optimizer.state_dict(),
                                state, tc.keep_checkpoints, extra=self.checkpoint_weights())
            if self.info.main:
                plot_losses(self.metrics.records(), self.run_dir / "loss.png",
                            f"{self.config.model.kind}: {self.run_dir.name}", self.VALIDATION_KEY)
        except Exception as error:
            if not out_of_space(error):
                raise
            # Each writer removed its temporary file, so what is on disk is the checkpoints that were complete.
            latest = latest_checkpoint(self.run_dir)
            intact = (f"the last complete checkpoint, step {checkpoint_step(latest)}, is intact" if latest is not None
                      else "no checkpoint was complete yet")
            raise ResourceError(f"no space left on the device of {self.run_dir} ({intact}); make room and continue "
                                f"with `{self.RESUME_COMMAND} --out {self.run_dir} --resume`") from None
        self.info.barrier()

    def checkpoint_state(self) -> dict:
        """What a checkpoint's state.json records beyond the step (see `restore`)."""
        return {}

    def checkpoint_weights(self) -> dict[str, dict]:
        """Weights a checkpoint keeps beyond the model's, its average's and the optimizer's."""
        return {}

    def restore(self, loaded: dict) -> None:
        """Take back what `checkpoint_state` and `checkpoint_weights` saved."""

    def describe_validation(self, value: float) -> str:
        return describe_validation(self.config.model, value)

    def elapsed(self) -> float:
        """Seconds the run has been running over all its starts, set-up included: a resumed run
        continues from what its checkpoint recorded, as its steps do (time spent after it is lost)."""
        return self.seconds_before + time.monotonic() - self.started

    def write_record(self, record: dict) -> None:
        """A metrics.jsonl record, stamped with the wall clock (`time`, Unix seconds) and the run's
        own (`elapsed_s`); its numbers go to the tracker too, at its step."""
        record.update(time=round(time.time(), 3), elapsed_s=round(self.elapsed(), 3))
        self.metrics.write(record)
        self.tracker.scalars(record, record["step"])

    def status(self) -> dict:
        """Fields that each training record and the progress bar show beyond the loss."""
        return {}

    def run(self) -> None:
        """Optimisation steps until max_steps, with the periodic log, validation and checkpoint;
        an interrupt saves the step it reached."""
        tc, config = self.config.train, self.config
        if self.step >= tc.max_steps:
            self.log(f"{self.run_dir} has already trained {self.step} of {tc.max_steps} steps")
            return
        self.log(f"model: {config.model.kind}, {self.model.num_parameters() / 1e6:.2f}M parameters; "
                 f"{self.info.world_size} process(es) on {self.device} "
                 f"({describe_precision(self.device, tc.precision)}); global batch {tc.batch_size} x "
                 f"{config.model.length} tokens = {self.accumulation} micro-batch(es) of {self.micro} per process")
        progress = None
        if self.info.main and tc.progress:
            from tqdm import tqdm

            progress = tqdm(total=tc.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        last_val = None
        if self.step == 0 and tc.init_from:  # where the weights start on this run's data: the fine-tuning's baseline
            last_val = self.validate()
            self.log(f"step 0, the weights of {tc.init_from}: {self.describe_validation(last_val)}")
        window = LossWindow()  # after that validation, which is no part of the first steps' speed
        self.model.train()
        try:
            while self.step < tc.max_steps:
                loss, grad_norm, lr = self.optimisation_step()
                window.add(loss, tc.batch_size * config.model.length)
                final = self.step == tc.max_steps
                if self.step % tc.log_every == 0 or final:
                    status = self.status()
                    record = {"step": self.step, **window.flush(), "lr": lr, "grad_norm": grad_norm, **status}
                    self.write_record(record)
                    if progress is not None:
                        progress.set_postfix(**status, loss=f"{record['loss']:.3f}",
                                             tok_s=f"{record['tokens_per_s']:.0f}",
                                             **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
                if progress is not None:
                    progress.update(1)
                if (tc.eval_every and self.step % tc.eval_every == 0) or final:
                    last_val = self.validate()
                    if progress is None:
                        self.log(f"step {self.step}: {self.describe_validation(last_val)}")
                if (tc.save_every and self.step % tc.save_every == 0) or final:
                    self.save()
        except KeyboardInterrupt:
            if progress is not None:
                progress.close()
            latest = latest_checkpoint(self.run_dir)
            if self.info.world_size == 1 and self.step > 0 and (latest is None
                                                                 or not latest.name.endswith(f"{self.step:07d}")):
                self.save()
                self.log(f"interrupted: saved step {self.step}; continue with `{self.RESUME_COMMAND} --out "
                         f"{self.run_dir} --resume`")
            raise
        if progress is not None:
            progress.close()
        self.log(f"done: {self.step} steps; {self.describe_validation(last_val)}; run saved in "
                 f"{self.run_dir}")


class LossWindow:
    """The mean training loss and the tokens/s since the last logged step."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.started = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens

    def flush(self) -> dict:
        record = {"loss": self.loss / self.steps, "tokens_per_s": self.tokens / (time.perf_counter() - self.started)}
        self.__init__()
        return record


def wait_for_data(run_dir: Path, recipe: dict, poll: float = 1.0, say_every: float = 300.0, log=print) -> None:
    """What every process but the first does while the first prepares the run's data: wait for the
    finished data of `recipe` to appear (the run directory is on a file system they share). No
    collective timeout applies; if the first process fails, torchrun stops the others."""
    started = last = time.monotonic()
    while not same_recipe(prepared_recipe(run_dir), recipe):
        time.sleep(poll)
        if time.monotonic() - last >= say_every:
            last = time.monotonic()
            log(f"rank {os.environ.get('RANK', '?')}: waiting {last - started:.0f} s for the data in {run_dir}")


def _remove_created(existed: dict[Path, bool]) -> None:
    """Undo a failed data step: remove the directories it created (the run directory itself if it
    was new), so that no empty or half-prepared run is left behind."""
    for path, was_there in existed.items():
        if not was_there and path.exists():
            shutil.rmtree(path, ignore_errors=True)


def describe_validation(model_config, nll: float) -> str:
    name, unit = validation_metric(model_config)
    extra = {"ar": f" (perplexity {math.exp(nll):.1f})", "vq": f" (PSNR {psnr(nll):.2f} dB)",
             "ELBO": f" (perplexity <= {math.exp(nll):.1f})"}
    return (f"validation {name} {nll:.{5 if name == 'MSE' else 4}f} {unit}"
            + extra.get(model_config.kind, extra.get(name, "")))


def _evaluation_rows(num_rows: int, wanted: int) -> list[int]:
    """`wanted` validation rows spread evenly over the split (all when wanted is 0 or too large)."""
    if wanted == 0 or wanted >= num_rows:
        return list(range(num_rows))
    return np.linspace(0, num_rows - 1, wanted).round().astype(int).tolist()
