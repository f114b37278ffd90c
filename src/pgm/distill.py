"""`pgm distill`: multi-round Self-Distillation Through Time for text PGMs and MDLMs.

A distillation is a run (`RUN/config.json` with a `distill` section, checkpoints, metrics) whose
student starts as the teacher and is trained by the loop of `pgm.train` with the SDTT loss of
`pgm.objectives.distill`. Both models are asked only what their own sampler would ask them: a
PGM sees the revealed tokens as its clean set and is queried at hidden positions (no mask token
goes in), an MDLM sees the sequence with mask tokens. The teacher's predictions are computed
only at the hidden positions, each once: at the step in which the teacher reveals it (or at its
last step), so the targets are [hidden tokens, V], not [B, L, V].

Rounds: round r's teacher samples in `start_steps / n^r` steps; at the end of a round the
student's weights (`grow_from`) become the teacher, and each round's model is kept as a
pretrained directory in `RUN/rounds/round-R` (round-0: the first teacher), which `pgm report`
compares across step counts. The teacher's weights are in every checkpoint, so a run resumes
exactly, also across a round boundary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import DataConfig, link_prepared, load_tokenizer, prepare_data, prepared_recipe, same_recipe
from .data.config import TOKENIZER_FIELDS
from .errors import ConfigError, RunError
from .eval.perplexity import seed_for
from .formats import TOKENIZER_DIR, Origin
from .models import build_model
from .objectives.distill import DistillNoise, distribution_log_probs, divergence, draw_distill_noise, teacher_times
from .objectives.losses import model_config
from .objectives.schedules import LogLinearSchedule
from .objectives.text import sample_groups
from .runs import RunConfig, latest_checkpoint, read_run_config
from .sampling.categorical import sample_categorical
from .train import Trainer, run_trainer
from .train_config import DistillConfig, TrainConfig

DISTILLED_KINDS = ("pgm", "mdlm")
ROUNDS_DIR = "rounds"


def predicted_log_probs(model, tokens: torch.Tensor, clean: torch.Tensor, queries: torch.Tensor,
                        sigma: torch.Tensor | None) -> torch.Tensor:
    """Float32 log-probabilities [N, V] at the N `queries` [B, L] (row by row, positions in order)
    given the tokens at `clean` [B, L], through the model's own view. `sigma` [B]: the noise level
    a time-conditioned model receives."""
    config = model_config(model)
    cond = sigma if config.time_conditioning else None
    if config.kind == "pgm":
        clean_counts, query_counts = clean.sum(1), queries.sum(1)
        # At least one clean column: a row with none has it masked out (its queries then read zeros).
        width, queried = max(1, int(clean_counts.max())), int(query_counts.max())
        clean_positions = clean.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
        query_positions = queries.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :queried]
        lengths = None if bool((clean_counts == width).all()) else clean_counts
        logits = model.predict(tokens.gather(1, clean_positions), clean_positions, query_positions, lengths, cond,
                               check_inputs=False)
        logits = logits[torch.arange(queried, device=tokens.device) < query_counts[:, None]]
    else:
        hidden, cond_vector = model.encode(torch.where(clean, tokens, config.mask_token_id), cond, check_inputs=False)
        logits = model.logits_at(hidden, cond_vector, queries)
    return distribution_log_probs(logits, config.mask_token_id)


class StudentView(torch.nn.Module):
    """The student's `predicted_log_probs` as a module call, so that DistributedDataParallel, which
    synchronises gradients of what goes through a module's forward, wraps it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, clean, queries, sigma):
        return predicted_log_probs(self.model, tokens, clean, queries, sigma)


def hidden_positions(tokens: torch.Tensor, noise: DistillNoise, schedule: LogLinearSchedule,
                     always_clean: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """Bool [B, L]: the tokens hidden at the noise's times (never a given token or padding)."""
    hidden = sample_groups(noise.t, tokens.shape, always_clean=always_clean, schedule=schedule, u=noise.hide)
    return hidden if valid is None else hidden & valid.bool()


@torch.no_grad()
def teacher_targets(teacher, tokens: torch.Tensor, hidden: torch.Tensor, noise: DistillNoise, dt: float,
                    schedule: LogLinearSchedule = LogLinearSchedule()) -> torch.Tensor:
    """The teacher's log-probabilities [N, V] for the N `hidden` tokens (row by row): the
    prediction of the ancestral step (of `noise.reveal.shape[1]`, size dt, from the noise's times)
    that reveals each token, or of the last step for a token none reveals."""
    config = model_config(teacher)
    steps = noise.reveal.shape[1]
    times = teacher_times(noise.t, dt, steps)
    row_of = hidden.flatten().cumsum(0).view_as(hidden) - 1  # each hidden token's row in the targets
    targets = torch.zeros(int(hidden.sum()), config.vocab_size, device=tokens.device)
    state = torch.where(hidden, config.mask_token_id, tokens)  # the teacher never reads what is hidden
    still_hidden = hidden.clone()
    for k in range(steps):
        last = k == steps - 1
        reveal_probability = schedule.reveal_probability(times[:, k], times[:, k + 1])
        revealed = still_hidden & (noise.reveal[:, k] < reveal_probability[:, None])
        queried = still_hidden if last else revealed
        if not bool(queried.any()):
            continue
        log_probs = predicted_log_probs(teacher, state, ~still_hidden, queried, schedule.sigma(times[:, k]))
        targets[row_of[queried]] = log_probs
        if not last:
            state[revealed] = sample_categorical(log_probs, uniforms=noise.draw[revealed])
            still_hidden &= ~revealed
    return targets


def divergence_sum(student, teacher, tokens: torch.Tensor, noise: DistillNoise, dt: float, kind: str,
                   schedule: LogLinearSchedule, always_clean: torch.Tensor | None = None,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(the sum of the `kind` divergence over the hidden tokens, their count) of one batch: the
    `student` (a StudentView) predicts each hidden token once at the noise's time, the teacher
    as `teacher_targets`."""
    hidden = hidden_positions(tokens, noise, schedule, always_clean, valid)
    targets = teacher_targets(teacher, tokens, hidden, noise, dt, schedule)
    predicted = student(tokens, ~hidden, hidden, schedule.sigma(noise.t))
    return divergence(predicted, targets, kind).sum(), int(hidden.sum())


def load_teacher(source: str | Path, weights: str):
    """The text pipeline of a teacher to distil (a PGM or MDLM), on the CPU. `weights`: "ema",
    "raw", or "auto" for what its samplers use (a run's average when it kept one)."""
    from .pipeline import load

    pipe = load(source, device="cpu", weights=None if weights == "auto" else weights)
    kind = pipe.config.kind
    if pipe.modality != "text" or kind not in DISTILLED_KINDS:
        what = "an image model" if pipe.modality != "text" else f"a model of kind {kind}"
        raise ConfigError(f"SDTT distils text PGMs and MDLMs; {source} holds {what}")
    return pipe


def distillation_config(teacher: str | Path, train: TrainConfig, distill: DistillConfig,
                        overrides: list[str]) -> tuple[RunConfig, object]:
    """(the run configuration, the teacher's pipeline) of distilling `teacher`: the teacher's
    model, the data of its run (or the built-in corpus), `train` and `distill` with `key=value`
    overrides. The model and the tokenizer are the teacher's and cannot be overridden;
    train.max_steps follows the rounds."""
    weights = distill.teacher_weights
    for assignment in overrides:
        key, _, value = assignment.partition("=")
        section, _, field = key.rpartition(".")
        if section == "model":
            raise ConfigError(f"{key}: the student has the teacher's architecture; the model cannot be overridden")
        if field == "max_steps" and section in ("", "train"):
            raise ConfigError("a distillation's length is distill.round_steps x its rounds; set distill.round_steps")
        if field in TOKENIZER_FIELDS and section in ("", "data"):
            raise ConfigError(f"{key}: a distillation encodes its data with the teacher's tokenizer")
        if field == "teacher" and section in ("", "distill"):
            raise ConfigError("the teacher is the command's first argument, not a setting")
        if field == "teacher_weights" and section in ("", "distill"):
            weights = distill.replace(teacher_weights=DistillConfig.parse_value(field, value)).teacher_weights
    pipe = load_teacher(teacher, weights)
    run_dir = pipe.model.origin.run_dir
    data = DataConfig(tokenizer="teacher")
    if run_dir is not None:  # its data, and whether its BOS was given (outside the partition)
        trained = read_run_config(run_dir)
        data, train = trained.data, train.replace(bos_always_clean=trained.train.bos_always_clean)
    where = str(Path(teacher).resolve()) if Path(teacher).exists() else str(teacher)
    config = RunConfig(model=pipe.config, data=data, train=train,
                       distill=distill.replace(teacher=where)).with_overrides(overrides)
    return dataclasses.replace(config, train=config.train.replace(max_steps=config.distill.total_steps)), pipe


def distill(config: RunConfig, run_dir: Path, *, resume: bool = False, teacher=None, log=print) -> Path:
    """Distil `config.distill.teacher` into the run directory `run_dir` (see the module doc).
    `teacher`: its pipeline when the caller has loaded it already."""
    if config.train.parallel != "ddp":
        raise RunError("pgm distill runs with train.parallel=ddp (its teacher and rounds are not sharded)")
    return run_trainer(Distiller, config, run_dir, resume=resume, log=log, teacher=teacher)


class Distiller(Trainer):
    """A `Trainer` whose loss is SDTT against a teacher that the student replaces after each round."""

    VALIDATION_KEY = "val_divergence"
    RESUME_COMMAND = "pgm distill"

    def __init__(self, config: RunConfig, run_dir: Path, info, log, teacher=None):
        if config.distill is None:
            raise RunError(f"{run_dir} is a training run, not a distillation: continue it with pgm train --resume")
        if config.data.format == "pairs":
            raise RunError("pgm distill distils on text rows; data.format=pairs is for fine-tuning with pgm train")
        if config.distill.grow_from == "ema" and config.train.ema <= 0:
            raise RunError("distill.grow_from=ema needs an average of the student's weights: set train.ema > 0")
        super().__init__(config, run_dir, info, log)
        self.settings = config.distill
        self.schedule = LogLinearSchedule()
        # A new run starts from the teacher; a resumed one takes student and teacher from its checkpoint.
        self.teacher_pipe = None
        if latest_checkpoint(run_dir) is None:
            self.teacher_pipe = teacher or load_teacher(config.distill.teacher, config.distill.teacher_weights)

    # --- set-up -------------------------------------------------------------------------------

    def write_data(self, recipe: dict) -> None:
        """The data the student learns from, encoded with the teacher's tokenizer: the teacher's own
        run's rows, linked, when the recipe is the same; the configured data encoded anew otherwise."""
        teacher_run = self.teacher_pipe.model.origin.run_dir if self.teacher_pipe else None
        if teacher_run is not None and same_recipe(prepared_recipe(teacher_run), recipe):
            link_prepared(teacher_run, self.run_dir)
            return
        prepare_data(self.config.data, self.config.model.length, self.run_dir, log=self.log,
                     tokenizer=self._teacher_tokenizer(), progress=self.config.train.progress)

    def given_tokenizer(self):
        """The teacher's tokenizer, which the student's data is encoded with whatever data.tokenizer says."""
        return self._teacher_tokenizer(), "the teacher's"

    def _teacher_tokenizer(self):
        return self.teacher_pipe.tokenizer if self.teacher_pipe else load_tokenizer(self.run_dir / TOKENIZER_DIR)

    def resolved_config(self) -> RunConfig:
        return self.config  # the student is the teacher's model, whatever the data

    def build(self) -> None:
        """The student (the teacher's weights), its optimizer and average, and the teacher."""
        super().build()
        self.teacher = build_model(self.config.model).to(self.device).eval().requires_grad_(False)
        self.teacher_round = 0
        if self.teacher_pipe is not None:  # a new run (a resumed one takes both from its checkpoint)
            state = self.teacher_pipe.model.state_dict()
            self.model.load_state_dict(state)
            self.teacher.load_state_dict(state)
            if self.ema is not None:
                self.ema = type(self.ema)(self.model, self.config.train.ema)
            if self.info.main:
                self._keep_round(0)
            self.teacher_pipe = None

    def network_module(self) -> torch.nn.Module:
        return StudentView(self.model)

    def checkpoint_state(self) -> dict:
        return {"teacher_round": self.teacher_round}

    def checkpoint_weights(self) -> dict[str, dict]:
        return {"teacher": self.teacher.savable_state()}

    def restore(self, loaded: dict) -> None:
        if "teacher" not in loaded["extra"] or "teacher_round" not in loaded["state"]:
            raise RunError(f"{self.run_dir}'s latest checkpoint has no teacher: it was not written by pgm distill")
        self.teacher.load_state_dict(loaded["extra"]["teacher"])
        self.teacher_round = loaded["state"]["teacher_round"]

    # --- rounds -------------------------------------------------------------------------------

    def _grown_weights(self) -> dict:
        if self.settings.grow_from == "ema":
            return self.ema.state_dict(self.model)
        return self.model.state_dict()

    def _keep_round(self, round_: int) -> None:
        """RUN/rounds/round-R: the teacher as it is now, a pretrained directory (round 0 is kept
        while the first teacher's pipeline is at hand)."""
        settings = self.settings
        if round_ == 0:
            description = {"round": 0, "sampling_steps": settings.start_steps}
            weights, source = self.teacher_pipe.model.origin.card.get("weights"), settings.teacher
        else:
            description = {"round": round_, "sampling_steps": settings.student_steps(round_ - 1),
                           "teacher_steps": settings.teacher_steps(round_ - 1), "divergence": settings.divergence}
            weights, source = settings.grow_from, f"{self.run_dir} (round {round_} of {settings.rounds})"
        card = {"weights": weights, "source": source, "distillation": description}
        self.teacher.origin = Origin(source=str(self.run_dir), tokenizer_dir=self.run_dir / TOKENIZER_DIR, card=card)
        self.teacher.save_pretrained(self.run_dir / ROUNDS_DIR / f"round-{round_}")

    def _grow(self, round_: int) -> None:
        """The student becomes the teacher of `round_` (0-based), and is kept as round-`round_`."""
        self.teacher.load_state_dict(self._grown_weights())
        self.teacher_round = round_
        if self.info.main:
            self._keep_round(round_)

    def run(self) -> None:
        super().run()
        if self.step >= self.config.train.max_steps and self.info.main:
            self.teacher.load_state_dict(self._grown_weights())
            self._keep_round(self.settings.rounds)
            self.log(f"the {self.settings.end_steps}-step student: {self.run_dir / ROUNDS_DIR}/"
                     f"round-{self.settings.rounds}; every round's model in {self.run_dir / ROUNDS_DIR}")

    # --- the loss -----------------------------------------------------------------------------

    def _dt(self) -> float:
        return 1.0 / self.settings.teacher_steps(self.teacher_round)

    def step_noise(self, rows: np.ndarray, generator: torch.Generator) -> DistillNoise:
        """This step's noise, after growing the teacher where a round begins; also counts the hidden
        tokens of the whole global batch, which every process divides its sum by."""
        round_ = self.settings.round_of(self.step)
        if round_ != self.teacher_round:
            self._grow(round_)
        noise = draw_distill_noise(len(rows), self.config.model.length, self.settings.num_distill_steps,
                                   generator=generator)
        tokens, valid = self.data.train[rows]
        hidden = hidden_positions(tokens, noise, self.schedule, self._always_clean(tokens), valid)
        self.hidden_in_batch = max(1, int(hidden.sum()))
        return noise

    def _divergence_sum(self, network, tokens, valid, noise) -> tuple[torch.Tensor, int]:
        return divergence_sum(network, self.teacher, tokens, noise, self._dt(), self.settings.divergence,
                              self.schedule, self._always_clean(tokens), valid)

    def batch_loss(self, tokens, valid, noise, **labeled) -> torch.Tensor:
        total, _ = self._divergence_sum(self.network, tokens, valid, noise)
        # DDP averages the processes' gradients: scaled by their number, the sum over every process
        # and micro-batch is the mean over the hidden tokens of the global batch.
        return total * self.info.world_size / self.hidden_in_batch

    def validation_record(self) -> dict:
        """The divergence to the current teacher on the evaluation rows (noise fixed by the seed),
        and the student's validation ELBO."""
        record = super().validation_record()
        rows, length = self.eval_indices, self.config.model.length
        noise = draw_distill_noise(len(rows), length, self.settings.num_distill_steps,
                                   generator=torch.Generator().manual_seed(seed_for(self.config.train.seed, 0, 0, 2)))
        mine = list(range(self.info.rank, len(rows), self.info.world_size))
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.model.eval()
        with torch.no_grad(), self.autocast():
            for start in range(0, len(mine), self.micro):
                part = mine[start:start + self.micro]
                tokens, valid = self.data.val[[rows[i] for i in part]]
                total, count = self._divergence_sum(StudentView(self.model), tokens.to(self.device),
                                                    None if valid is None else valid.to(self.device),
                                                    noise[part].to(self.device))
                totals += torch.tensor([float(total), count], dtype=torch.float64, device=self.device)
        self.model.train()
        if self.info.world_size > 1:
            dist.all_reduce(totals)
        return {**record, "val_divergence": float(totals[0] / totals[1].clamp(min=1)),
                "round": self.teacher_round + 1}

    def describe_validation(self, value: float) -> str:
        if value is None:
            return "no validation"
        return f"validation {self.settings.divergence} divergence to the teacher {value:.4f} nats/token"

    def status(self) -> dict:
        round_ = self.settings.round_of(self.step - 1)
        return {"round": round_ + 1, "student_steps": self.settings.student_steps(round_)}


__all__ = ["distill", "distillation_config", "load_teacher", "teacher_targets", "predicted_log_probs",
           "hidden_positions", "divergence_sum", "Distiller", "ROUNDS_DIR"]
