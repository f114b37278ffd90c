"""Text generation from a trained model and its tokenizer: prompts, infilling templates,
decoding orders, EOS-aware output.

An infilling template is text with gaps written `{{N}}`, N tokens each:

    "The old man {{12}} the sea. {{30}}"

Text outside the gaps is kept; the gaps are generated (by a diffusion model: an AR model can
only continue a prefix).
"""

from __future__ import annotations

import re

import torch

from .sampling import SamplingOptions, sample_autoregressive, sample_mdlm, sample_pgm
from .sampling.pgm import ORDERS

SAMPLERS = {
    "pgm": ("uniform", "binomial", "reference"),
    "mdlm": ("ancestral", "ancestral-nocache", "ancestral-full"),
    "ar": ("kv-cache", "no-cache"),
}
GAP = re.compile(r"\{\{(\d+)\}\}")


def template_tokens(tokenizer, template: str) -> tuple[list[int], list[bool]]:
    """(ids, known flags) of an infilling template, without the BOS."""
    ids, known, cursor = [], [], 0
    for match in GAP.finditer(template):
        text = template[cursor:match.start()]
        if text:
            piece = tokenizer.encode_batch([text])[0]
            ids += piece
            known += [True] * len(piece)
        size = int(match.group(1))
        if size < 1:
            raise ValueError(f"a gap must hold at least one token: {match.group(0)}")
        ids += [0] * size
        known += [False] * size
        cursor = match.end()
    tail = template[cursor:]
    if tail:
        piece = tokenizer.encode_batch([tail])[0]
        ids += piece
        known += [True] * len(piece)
    return ids, known


def known_from_text(tokenizer, *, num_samples: int, length: int | None, max_length: int, prompts=(),
                    templates=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Known tokens and mask [num_samples, length]: a BOS at position 0, then row i's prompt (or
    infilling template), cycling through those given. Positions after them are generated. The
    length defaults to the model's with prompts, and to the template's own with templates."""
    if prompts and templates:
        raise ValueError("give prompts or infilling templates, not both")
    rows = [(tokenizer.encode_batch([p])[0], None) for p in prompts] + [template_tokens(tokenizer, t) for t in templates]
    rows = [(ids, flags if flags is not None else [True] * len(ids)) for ids, flags in rows] or [([], [])]
    needed = 1 + max(len(ids) for ids, _ in rows)
    if length is None:
        length = needed if templates else max_length
    if needed > length or length > max_length:
        raise ValueError(f"the prompt or template takes {needed - 1} tokens + BOS, which does not fit in "
                         f"{min(length, max_length)} positions (the model's length is {max_length})")
    known_tokens = torch.zeros(num_samples, length, dtype=torch.long)
    known_mask = torch.zeros(num_samples, length, dtype=torch.bool)
    known_tokens[:, 0], known_mask[:, 0] = tokenizer.bos_id, True
    for row in range(num_samples):
        ids, flags = rows[row % len(rows)]
        known_tokens[row, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        known_mask[row, 1:1 + len(ids)] = torch.tensor(flags, dtype=torch.bool)
    return known_tokens, known_mask


def generate_tokens(model, *, known_tokens: torch.Tensor, known_mask: torch.Tensor, steps: int,
                    sampler: str | None = None, order: str = "random", options: SamplingOptions = SamplingOptions(),
                    generator: torch.Generator | None = None, stats: dict | None = None) -> torch.Tensor:
    kind = model.config.kind
    sampler = sampler or SAMPLERS[kind][0]
    if sampler not in SAMPLERS[kind]:
        raise ValueError(f"a {kind} model samples with {', '.join(SAMPLERS[kind])}, not {sampler!r}")
    if order != "random" and kind != "pgm":
        raise ValueError(f"decoding orders other than random are for PGM models, not {kind}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    device = next(model.parameters()).device
    common = dict(known_tokens=known_tokens.to(device), known_mask=known_mask.to(device), options=options,
                  generator=generator, stats=stats)
    if kind == "pgm":
        if sampler == "reference":
            return sample_pgm(model, steps=steps, order=order, view="reference", **common)
        return sample_pgm(model, steps=steps, counts=sampler, order=order, **common)
    if kind == "ar":
        return sample_autoregressive(model, use_cache=sampler == "kv-cache", **common)
    return sample_mdlm(model, steps=steps, cache=sampler != "ancestral-nocache",
                       logits_everywhere=sampler == "ancestral-full", **common)


def decode_samples(tokens: torch.Tensor, tokenizer, known_mask: torch.Tensor | None = None, *,
                   stop_at_eos: bool = False, mark_generated: bool = False) -> list[str]:
    """Text of each row, BOS dropped. An EOS separates documents (shown as a blank line);
    `stop_at_eos` ends the row at the first generated EOS; `mark_generated` wraps generated
    spans in [[ ]] so that infilled text stands out."""
    texts = []
    for index, row in enumerate(tokens.tolist()):
        flags = known_mask[index].tolist() if known_mask is not None else [False] * len(row)
        if row and row[0] == tokenizer.bos_id:
            row, flags = row[1:], flags[1:]
        if stop_at_eos:
            cut = next((i for i, (t, k) in enumerate(zip(row, flags)) if t == tokenizer.eos_id and not k), len(row))
            row, flags = row[:cut], flags[:cut]
        pieces, start = [], 0
        for i in range(1, len(row) + 1):
            if i == len(row) or flags[i] != flags[start] or row[i] == tokenizer.eos_id or row[i - 1] == tokenizer.eos_id:
                pieces.append((row[start:i], flags[start]))
                start = i
        text = ""
        for ids, known in pieces:
            if ids == [tokenizer.eos_id]:
                text = text.rstrip() + "\n\n"
                continue
            piece = tokenizer.decode(ids)
            text += f"[[{piece}]]" if mark_generated and not known else piece
        texts.append(text.strip())
    return texts
