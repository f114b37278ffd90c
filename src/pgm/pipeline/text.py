"""Text models (PGM, MDLM, AR): prompts, infilling templates and orders; scores and generative
perplexity."""

from __future__ import annotations

from pathlib import Path

from ..errors import SamplingError
from ..eval import generative_perplexity, load_evaluator, score_sequences
from ..generation import decode_samples, iterate_text, known_from_text
from ..objectives import objective_for
from ..sampling import StepUpdate
from .base import Pipeline, SamplingPlan
from .request import GenerationRequest, Samples, StepEvent, known_pairs, positive, settings_of, strings


class TextPipeline(Pipeline):
    """PGM, MDLM and AR text models: prompts, infilling, orders; `score`."""

    modality = "text"

    def plan(self, request: GenerationRequest) -> SamplingPlan:
        self.checked(request)
        kind = self.config.kind
        copies = positive("num_samples", request.num_samples, 1)
        prompts = strings("prompt", request.prompt) if request.prompt is not None else []
        templates = strings("infill", request.infill) if request.infill is not None else []
        if templates and kind == "ar":
            raise SamplingError("an autoregressive model can only continue a prompt; infilling needs a PGM or MDLM")
        length = request.length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
            raise SamplingError(f"length must be an integer, got {length!r}")
        known_tokens, known_mask = known_from_text(self.tokenizer, length=length, max_length=self.config.length,
                                                   prompts=prompts, templates=templates, copies=copies)
        settings = self.resolved(request.settings, int((~known_mask).sum(1).max()))

        def updates():
            return iterate_text(self.model, known_tokens=known_tokens, known_mask=known_mask, settings=settings,
                                generator=self.generator(request.seed), compile=self.compile)

        def finish(tokens, seconds):
            tokens = tokens.cpu()
            texts = decode_samples(tokens, self.tokenizer, known_mask, stop_at_eos=request.stop_at_eos,
                                   mark_generated=request.mark)
            return Samples(texts, tokens, known_mask, settings.steps, seconds, int((~known_mask).sum()),
                           settings={**settings.summary(), "num_samples": copies, "compile": self.compile})

        def text_event(committed: list[list[tuple[int, int]]], step: int, elapsed: float) -> StepEvent:
            return StepEvent.of(committed, step, settings.steps, elapsed,
                                pieces=[[self.tokenizer.decode([t]) for _, t in row] for row in committed])

        def event(update: StepUpdate, elapsed: float) -> StepEvent:
            return text_event(update.committed(), update.step, elapsed)

        def given() -> StepEvent:
            return text_event(known_pairs(known_tokens, known_mask), -1, 0.0)

        return SamplingPlan(settings.steps, known_tokens.shape[1], updates, finish, event, given)

    def score(self, texts, *, passes: int = 1, batch_size: int = 32, seed: int = 0) -> list:
        """How likely the model finds each text (after a BOS): a `TextScore` per text, the ELBO
        bound for PGM and MDLM (averaged over `passes` antithetic Monte-Carlo draws), the exact NLL
        for AR."""
        texts = strings("texts", texts)
        positive("passes", passes)
        if self.config.kind == "ar" and passes != 1:
            raise SamplingError("passes applies to a Monte-Carlo ELBO; an autoregressive model's scores are exact in "
                                "one pass: leave passes out")
        positive("batch_size", batch_size)
        sequences = [[self.tokenizer.bos_id, *ids] for ids in self.tokenizer.encode_batch(texts)]
        for number, ids in enumerate(sequences, 1):
            if len(ids) > self.config.length:
                raise SamplingError(f"text {number} takes {len(ids) - 1} tokens + BOS, more than the model's "
                                    f"{self.config.length} positions")
            if len(ids) < 2:
                raise SamplingError(f"text {number} is empty")
        return score_sequences(self.model, objective_for(self.model), sequences, passes=passes, seed=seed,
                               batch_size=batch_size, device=self.device, autocast=self.autocast)

    def generative_perplexity(self, evaluator, *, num_samples: int = 64, batch_size: int = 32, seed: int = 0,
                              **settings):
        """Unconditional samples scored by an evaluator (an AR run, hf:NAME, or an `Evaluator`
        already loaded): see `pgm.eval.generative`. `settings`: how to sample, as in `generate`
        (`SamplerSettings`: steps, sampler, cache_refresh, ...)."""
        positive("num_samples", num_samples)
        positive("batch_size", batch_size)
        resolved = self.resolved(settings_of(settings), self.config.length - 1)
        scorer = load_evaluator(str(evaluator), device=self.device) if isinstance(evaluator, (str, Path)) else evaluator
        return generative_perplexity(self.model, self.tokenizer, scorer, num_samples=num_samples, settings=resolved,
                                     batch_size=batch_size, seed=seed, autocast=self.autocast, compile=self.compile)
