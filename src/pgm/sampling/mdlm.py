"""MDLM's ancestral sampler over a full-length sequence with `[MASK]` tokens.

Between times t = 1 - i/S and s = 1 - (i+1)/S each masked token is revealed with probability
(alpha_s - alpha_t) / (1 - alpha_t) and, if revealed, drawn from the model's prediction; known
tokens are carried over. Drawing which tokens are revealed first and then sampling only those
is the same distribution as the usual categorical over [p_x0 * (alpha_s - alpha_t), 1 - alpha_s].
A model without time conditioning gives the same output for the same input, so when a step
reveals nothing the next step reuses it instead of running the network again.

Since only revealed positions need a prediction, the output layer (the largest matmul at a
GPT-2-sized vocabulary) runs only on them; `logits_everywhere=True` computes logits at every
position every step, as the authors' sampler (and the paper's MDLM speed figures) do.
"""

from __future__ import annotations

import torch

from ..objectives.schedules import LogLinearSchedule
from .categorical import SamplingOptions, sample_categorical
from .common import StepUpdate, check_known, model_device, resolve_known, run_to_end
from .compiled import check_compile_mode, compiled_call


def sample_mdlm(model, **options) -> torch.Tensor:
    """Generate [num_samples, length] ids: `iterate_mdlm` run to its end (same options)."""
    return run_to_end(iterate_mdlm(model, **options))


@torch.no_grad()
def iterate_mdlm(model, *, num_samples: int | None = None, length: int | None = None, steps: int,
                 known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                 options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None,
                 cache: bool = True, logits_everywhere: bool = False, compile: str | None = None,
                 stats: dict | None = None):
    """Generate [num_samples, length] ids in `steps` ancestral steps: a generator that yields a
    `StepUpdate` (the mask of the positions revealed) after every step that reveals something,
    and returns the ids. `compile`: a torch.compile mode for the network (see
    `pgm.sampling.compiled`), None: eager. `stats`, when given, receives the number of network
    calls under "forward_calls"."""
    check_compile_mode(compile)
    config = model.config
    known_tokens, known_mask = resolve_known(config, num_samples, length, known_tokens, known_mask,
                                             model_device(model))
    check_known(config, known_tokens, known_mask, steps)
    schedule = LogLinearSchedule()
    batch, length = known_tokens.shape
    device = known_tokens.device
    mask_id = config.mask_token_id
    x = torch.where(known_mask, known_tokens, mask_id)
    masked = ~known_mask
    cache = cache and not config.time_conditioning
    encoded = None
    calls = 0
    for step in range(steps):
        t, s = 1 - step / steps, 1 - (step + 1) / steps
        if encoded is None or not cache:
            cond = schedule.sigma(torch.full((batch,), t, device=device)) if config.time_conditioning else None
            if compile:
                encoded = compiled_call(model, "encode", compile, x, cond, check_inputs=False)
            else:
                encoded = model.encode(x, cond, check_inputs=False)
            calls += 1
            if logits_everywhere:
                all_logits = model.output_layer(*encoded)
        p = schedule.reveal_probability(t, s)
        reveal = masked & (torch.rand(batch, length, generator=generator, device=device) < p)
        if not bool(reveal.any()):
            continue
        logits = all_logits[reveal] if logits_everywhere else model.logits_at(*encoded, reveal)
        x[reveal] = sample_categorical(logits, options, suppress=(mask_id,), generator=generator)
        masked &= ~reveal
        encoded = None
        yield StepUpdate(step, mask=reveal, state=x)
    if stats is not None:
        stats["forward_calls"] = calls
    return x
