"""Text generation pieces: prompts and infilling templates turned into known tokens, the text
samplers of each model kind, and decoding the tokens back to text.

An infilling template is text with gaps written `{{N}}`, N tokens each:

    "The old man {{12}} the sea. {{30}}"

Text outside the gaps is kept; the gaps are generated (by a diffusion model: an AR model can
only continue a prefix). Anything else between double braces is a mistake and is refused.
"""

from __future__ import annotations

import re

import torch

from .errors import SamplingError
from .sampling import iterate_autoregressive, iterate_mdlm, iterate_pgm
from .sampling.settings import SamplerSettings

# A gap, or anything that looks like an attempt at one: `{{` ... `}}`, a lone `{{` or a lone `}}`.
_BRACES = re.compile(r"\{\{(.*?)\}\}|\{\{|\}\}")


def parse_template(template: str) -> list[str | int]:
    """The pieces of an infilling template: known text (str) and gap sizes (int), in order.
    Refuses a malformed gap (`{{x}}`, `{{-2}}`, `{{0}}`, an unclosed `{{4}`) and a template with
    no gap at all, each in one sentence."""
    if not isinstance(template, str):
        raise SamplingError(f"an infilling template is a string, got {type(template).__name__}")
    pieces: list[str | int] = []
    cursor = 0
    for match in _BRACES.finditer(template):
        inside = match.group(1)
        if inside is None:
            raise SamplingError(f"unmatched {match.group(0)!r} at character {match.start()} of the template "
                                f"{template!r}: write gaps as {{{{N}}}}")
        if not inside.strip().isdecimal() or int(inside) < 1:
            raise SamplingError(f"the gap {match.group(0)!r} in the template {template!r} is not a positive number "
                                f"of tokens: write gaps as {{{{N}}}}, e.g. {{{{8}}}}")
        if match.start() > cursor:
            pieces.append(template[cursor:match.start()])
        pieces.append(int(inside))
        cursor = match.end()
    if cursor < len(template):
        pieces.append(template[cursor:])
    if not any(isinstance(piece, int) for piece in pieces):
        raise SamplingError(f"the infilling template {template!r} has no gap {{{{N}}}}: add one, or use a prompt to "
                            "continue the text")
    return pieces


def template_tokens(tokenizer, template: str) -> tuple[list[int], list[bool]]:
    """(ids, known flags) of an infilling template, without the BOS; gaps hold id 0."""
    ids, known = [], []
    for piece in parse_template(template):
        if isinstance(piece, int):
            ids += [0] * piece
            known += [False] * piece
        else:
            encoded = tokenizer.encode_batch([piece])[0]
            ids += encoded
            known += [True] * len(encoded)
    return ids, known


def known_from_text(tokenizer, *, length: int | None, max_length: int, prompts=(), templates=(),
                    copies: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Known tokens and mask [rows, length]: a BOS at position 0, then a prompt (or infilling
    template); each prompt or template gets `copies` consecutive rows, or with none given,
    `copies` rows hold only the BOS. Positions after them are generated. The length defaults
    to the model's with prompts, and to the template's own with templates."""
    if prompts and templates:
        raise SamplingError("give prompts or infilling templates, not both")
    rows = [(tokenizer.encode_batch([p])[0], None) for p in prompts] + [template_tokens(tokenizer, t) for t in templates]
    rows = [(ids, flags if flags is not None else [True] * len(ids)) for ids, flags in rows] or [([], [])]
    needed = 1 + max(len(ids) for ids, _ in rows)
    what = "template" if templates else "prompt"
    if needed > max_length:
        raise SamplingError(f"the {what} takes {needed - 1} tokens + BOS, more than the model's {max_length} positions")
    if length is None:
        length = needed if templates else max_length
    if length < 2 or length > max_length:
        raise SamplingError(f"length must lie in [2, {max_length}] (the BOS and at least one token, at most the "
                            f"model's length), got {length}")
    if needed > length:
        raise SamplingError(f"the {what} takes {needed - 1} tokens + BOS, which does not fit in {length} positions "
                            f"(the model's length is {max_length})")
    if prompts and needed == length:
        raise SamplingError(f"the prompt fills all {length} positions, leaving nothing to generate: raise the length")
    known_tokens = torch.zeros(len(rows) * copies, length, dtype=torch.long)
    known_mask = torch.zeros(len(rows) * copies, length, dtype=torch.bool)
    known_tokens[:, 0], known_mask[:, 0] = tokenizer.bos_id, True
    for index, (ids, flags) in enumerate(rows):
        block = slice(index * copies, (index + 1) * copies)
        known_tokens[block, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        known_mask[block, 1:1 + len(ids)] = torch.tensor(flags, dtype=torch.bool)
    return known_tokens, known_mask


def iterate_text(model, *, known_tokens: torch.Tensor, known_mask: torch.Tensor,
                 settings: SamplerSettings = SamplerSettings(), generator: torch.Generator | None = None,
                 compile: str | None = None, stats: dict | None = None):
    """The sampling loop of `model`'s kind as `settings` say (its sampler: see
    `pgm.sampling.settings.SAMPLERS`; resolved here unless they already are): a generator of
    `StepUpdate`s that returns the tokens. `compile`: a torch.compile mode for the network of a
    PGM or MDLM (see `iterate_pgm`)."""
    kind = model.config.kind
    settings = settings.resolve(kind, "text", unknown=int((~known_mask).sum(1).max()), compile=compile)
    if kind == "ar" and compile:
        raise SamplingError("compile applies to PGM, MDLM and MaskGIT sampling, not to the autoregressive model")
    device = next(model.parameters()).device
    common = dict(known_tokens=known_tokens.to(device), known_mask=known_mask.to(device), options=settings.options,
                  generator=generator, stats=stats)
    sampler, steps = settings.sampler, settings.steps
    if kind == "pgm":
        view = dict(view="reference") if sampler == "reference" else dict(counts=sampler)
        return iterate_pgm(model, steps=steps, order=settings.order, compile=compile, **view, **settings.cache,
                           **common)
    if kind == "ar":
        return iterate_autoregressive(model, use_cache=sampler == "kv-cache", **common)
    return iterate_mdlm(model, steps=steps, cache=sampler != "ancestral-nocache",
                        logits_everywhere=sampler == "ancestral-full", compile=compile, **common)


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
