"""Our text models as an lm-evaluation-harness model, registered as `pgm`.

Importing this module registers it, so that `lm_eval.simple_evaluate(model="pgm",
model_args="path=RUN,num_mc=128")` finds it. The harness hands over text; this module turns it
into items for `pgm.eval.likelihood` the way the harness's own models do (trailing spaces of a
context move to the continuation; the continuation is what encoding both adds to the context
alone; a context too long for the model loses its beginning).

`method`: "conditional" (the default) scores the continuation given the clean context, with
what follows unknown; "whole-sequence" scores the ELBO of context and continuation together,
of the item alone, as the authors' adapter does (their numbers need it; it is not the
likelihood of the continuation). The greedy check is the same for both: the continuation
predicted at once from the context.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..errors import ArgumentError
from ..eval.likelihood import Item, TextScore, context_keys, greedy_suffixes, suffix_scores
from ..generation import iterate_text
from ..objectives import objective_for
from ..pipeline import TextPipeline, load
from ..sampling.common import run_to_end
from ..sampling.settings import SamplerSettings

METHODS = ("conditional", "whole-sequence")
DEFAULT_NUM_MC = 128  # Monte-Carlo samples per log-likelihood of a PGM or MDLM
GENERATION_OPTIONS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


@register_model("pgm")
class HarnessModel(LM):
    """`path`: a run, a pretrained directory or the authors' text checkpoint (anything `pgm.load`
    takes), or `pipeline`: one already loaded. `num_mc`: Monte-Carlo samples per log-likelihood
    (diffusion models; AR is exact); `batch_size`: rows per model call; `weights`: "ema" (the
    default where there is one) or "raw"; `gpt2_file`: GPT-2's BPE file for the authors'
    checkpoints offline; `steps`, `order`: `generate_until`'s sampler (default: one token per
    step, random order)."""

    def __init__(self, path: str | None = None, *, pipeline: TextPipeline | None = None, num_mc: int | None = None,
                 method: str = "conditional", batch_size: int = 64, seed: int = 0, device: str = "auto",
                 weights: str | None = None, precision: str = "auto", gpt2_file: str | None = None,
                 steps: int | None = None, order: str = "random", progress: bool = True, **unknown):
        super().__init__()
        unknown = {name: value for name, value in unknown.items() if value is not None}
        if unknown:
            raise ArgumentError(f"the pgm harness model takes path, num_mc, method, batch_size, seed, device, weights, "
                                f"precision, gpt2_file, steps and order, not {', '.join(sorted(unknown))}")
        if (path is None) == (pipeline is None):
            raise ArgumentError("give the pgm harness model a path (model_args=path=RUN) or a loaded pipeline")
        for name, value in (("num_mc", DEFAULT_NUM_MC if num_mc is None else num_mc), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
        if method not in METHODS:
            raise ArgumentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.pipe = pipeline if pipeline is not None else load(str(path), device=device, weights=weights,
                                                                        precision=precision, gpt2_file=gpt2_file)
        if self.pipe.modality != "text":
            raise ArgumentError(f"the harness scores text; {self.pipe.name} holds a {self.pipe.modality} model")
        exact = self.pipe.config.kind == "ar"
        if exact and num_mc not in (None, 1):
            raise ArgumentError(f"num_mc applies to Monte-Carlo likelihoods; {self.pipe.name} holds an autoregressive "
                                "model, whose likelihoods are exact: leave num_mc out")
        # The order and steps, checked for this model now (the positions left are not known yet).
        SamplerSettings(order=order).resolve(self.pipe.config.kind, "text", unknown=1)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ArgumentError(f"steps must be a positive integer, got {steps!r}")
        self.num_mc = 1 if exact else DEFAULT_NUM_MC if num_mc is None else num_mc
        self.method, self.batch_size, self.seed = method, batch_size, seed
        self.steps, self.order, self.progress = steps, order, progress
        self.objective = objective_for(self.pipe.model)
        self._device = self.pipe.device
        self.likelihoods: dict[str, list[float]] = {}  # per task: [nll, tokens, squared standard error]

    @property
    def settings(self) -> dict:
        """What the scores depend on, for the results file."""
        card = self.pipe.model.origin.card if self.pipe.model.origin else {}
        return {"source": self.pipe.name, "kind": self.pipe.config.kind, "weights": card.get("weights"),
                "num_mc": self.num_mc, "method": self.method,
                "seed": self.seed, "batch_size": self.batch_size, "dtype": self.pipe.dtype,
                "loglikelihood": self.loglikelihood_summary()}

    def loglikelihood_summary(self) -> dict:
        """Per task, over every continuation scored (all choices of a multiple choice): the
        log-likelihood per scored token, its Monte-Carlo standard error, and the token count."""
        return {task: {"per_token": -nll / tokens, "stderr": variance ** 0.5 / tokens, "tokens": int(tokens)}
                for task, (nll, tokens, variance) in self.likelihoods.items()}

    # --- text to items --------------------------------------------------------------------

    @property
    def _positions(self) -> int:
        return self.pipe.config.length

    def _encode(self, text: str) -> list[int]:
        return self.pipe.tokenizer.encode_batch([text])[0] if text else []

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self._encode(context)
        whole = self._encode(context + continuation)
        if whole[:len(context_ids)] == context_ids:
            return context_ids, whole[len(context_ids):]
        return context_ids, self._encode(continuation)

    def items(self, pairs: list[tuple[str, str]]) -> list[Item]:
        """The scorer's items for (context, continuation) texts."""
        return [self._item(*self._pair(context, continuation)) for context, continuation in pairs]

    def _item(self, context_ids: list[int], continuation_ids: list[int]) -> Item:
        """[BOS] + the context's end + the continuation, and where the continuation starts."""
        room = self._positions - 1 - len(continuation_ids)
        if not continuation_ids:
            raise ArgumentError("the harness asked for the likelihood of an empty continuation")
        if room < 0:
            raise ArgumentError(f"a continuation of {len(continuation_ids)} tokens does not fit the model's "
                                f"{self._positions} positions (BOS included)")
        context_ids = context_ids[len(context_ids) - room:] if len(context_ids) > room else context_ids
        return [self.pipe.tokenizer.bos_id, *context_ids, *continuation_ids], 1 + len(context_ids)

    # --- the harness's three requests ------------------------------------------------------

    def _score(self, items: list[Item], *, whole_sequence: bool) -> list[TextScore]:
        keys = context_keys(items)  # the choices of a question share their noise
        scored = [(ids, 1) for ids, _ in items] if whole_sequence else items
        return suffix_scores(self.pipe.model, self.objective, scored, passes=self.num_mc, seed=self.seed,
                             batch_size=self.batch_size, noise_keys=keys, unknown_future=not whole_sequence,
                             progress=self.progress, device=self.pipe.device, autocast=self.pipe.autocast)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        items = self.items([request.args for request in requests])
        if not items:
            return []
        scores = self._score(items, whole_sequence=self.method == "whole-sequence")
        greedy = greedy_suffixes(self.pipe.model, self.objective, items, batch_size=self.batch_size,
                                 progress=self.progress, device=self.pipe.device, autocast=self.pipe.autocast)
        for request, score in zip(requests, scores):
            totals = self.likelihoods.setdefault(getattr(request, "task_name", None) or "", [0.0, 0, 0.0])
            totals[0] += score.nll
            totals[1] += score.tokens
            totals[2] += score.stderr ** 2
        return [(-score.nll, right) for score, right in zip(scores, greedy)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text in windows of the model's positions, every token scored once, a window's
        context the token before it (the harness's windows); always the conditional ELBO."""
        bos = self.pipe.tokenizer.bos_id
        items, owners = [], []
        for owner, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(self._encode(text), bos, self._positions - 2, 1)
            for number, window in enumerate(map(make_disjoint_window, windows)):
                context, continuation = window
                items.append(self._item(context[1:] if number == 0 else context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self._score(items, whole_sequence=False) if items else []):
            totals[owner] -= score.nll
        return totals

    def generate_until(self, requests) -> list[str]:
        """The continuation of each context by the model's sampler (one token per step unless
        `steps`), cut at the first stop string or EOS; greedy unless the task samples. Requests
        of one length are decoded together."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int], int, list[str]]]] = {}
        for index, request in enumerate(requests):
            context, options = request.args
            until, new_tokens, sampling = self._generation_options(dict(options))
            new_tokens = min(new_tokens, self._positions - 1)
            room = self._positions - 1 - new_tokens
            context_ids = self._encode(context)
            context_ids = context_ids[len(context_ids) - room:] if len(context_ids) > room else context_ids
            # An MDLM sees what follows as masks up to its length (as when it scores); a PGM never
            # sees positions it is not asked about.
            length = self._positions if self.pipe.config.kind == "mdlm" else 1 + len(context_ids) + new_tokens
            groups.setdefault((length, sampling), []).append((index, context_ids, new_tokens, until))
        for (length, sampling), members in groups.items():
            known = torch.zeros(len(members), length, dtype=torch.long)
            known_mask = torch.zeros(len(members), length, dtype=torch.bool)
            for row, (_, context_ids, _, _) in enumerate(members):
                known[row, :1 + len(context_ids)] = torch.tensor([self.pipe.tokenizer.bos_id, *context_ids])
                known_mask[row, :1 + len(context_ids)] = True
            unknown = int((~known_mask).sum(1).max())
            steps = None if self.pipe.config.kind == "ar" else min(self.steps or unknown, unknown)
            temperature, top_p = sampling
            settings = SamplerSettings(steps=steps, order=self.order, temperature=temperature, top_p=top_p)
            generator = torch.Generator(device=self.pipe.device).manual_seed(self.seed)
            with torch.no_grad(), self.pipe.autocast():
                tokens = run_to_end(iterate_text(self.pipe.model, known_tokens=known, known_mask=known_mask,
                                                 settings=settings, generator=generator,
                                                 compile=self.pipe.compile)).cpu()
            for row, (index, context_ids, new_tokens, until) in enumerate(members):
                start = 1 + len(context_ids)
                outputs[index] = self._cut(tokens[row, start:start + new_tokens].tolist(), until)
        return outputs

    @staticmethod
    def _generation_options(options: dict) -> tuple[list[str], int, tuple[float, float]]:
        unknown = sorted(set(options) - set(GENERATION_OPTIONS))
        if unknown:
            raise ArgumentError(f"the pgm harness model generates with {', '.join(GENERATION_OPTIONS)}, not "
                                f"{', '.join(unknown)}")
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(options.get("do_sample", False))
        temperature = float(options.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        new_tokens = int(options.get("max_gen_toks", 256))
        if new_tokens < 1:
            raise ArgumentError(f"max_gen_toks must be positive, got {new_tokens}")
        return until, new_tokens, (temperature, float(options.get("top_p", 1.0)))

    def _cut(self, ids: list[int], until: list[str]) -> str:
        eos = self.pipe.tokenizer.eos_id
        text = self.pipe.tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text
