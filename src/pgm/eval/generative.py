"""Generative perplexity: how likely an evaluator language model finds a model's samples.

The paper's protocol (MDLM's): draw samples with float64 categorical sampling, score them with a
larger autoregressive model (gpt2-large there), and report exp of the token-weighted mean NLL.
Beside it, the mean unigram entropy of each sample's tokens: repetitive, degenerate text gets a
low perplexity, and a low entropy gives it away.

An evaluator is one of our AR runs (offline) or any Hugging Face causal LM (`hf:NAME`, needs
`transformers`). When it shares the samples' tokenizer, the sampled ids are scored as they are;
otherwise each sample is cut at its EOS tokens, decoded, re-encoded with the evaluator's
tokenizer and joined with the evaluator's EOS. Every scored sequence starts after the
evaluator's BOS, so its first token is scored too; a sequence longer than the evaluator's context
is scored in consecutive windows, each restarting after the BOS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_tokenizer
from ..devices import synchronize
from ..errors import ArgumentError, MissingDependency
from ..formats import TOKENIZER_DIR
from ..generation import iterate_text
from ..hub import load_pretrained_dir
from ..objectives import token_nll
from ..sampling import run_to_end
from ..sampling.settings import SamplerSettings


@dataclasses.dataclass
class GenerativeResult:
    perplexity: float  # exp of the evaluator's NLL per token over all samples
    nll: float  # nats per evaluator token
    nll_stderr: float  # its standard error over the samples (a ratio estimate; 0 for one sample)
    evaluator_tokens: int
    entropy: float  # mean over samples of the unigram entropy of its generated tokens (nats)
    num_samples: int
    steps: int
    generated_tokens: int
    sampling_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.sampling_seconds


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the empirical distribution of `ids`: 0 for one repeated token, log(n)
    for n distinct tokens."""
    if not ids:
        return 0.0
    total = len(ids)
    return -sum(count / total * math.log(count / total) for count in Counter(ids).values())


class Evaluator:
    """Scores id sequences of its own tokenizer with a causal language model."""

    name: str
    tokenizer: object  # encode_batch, decode, bos_id, eos_id
    context: int  # positions the model sees at once, BOS included
    batch_size: int
    device: torch.device

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> tuple[list[float], list[int]]:
        """(summed NLL in nats, number of scored tokens) for each sequence."""
        windows = [(owner, ids[start:start + self.context - 1]) for owner, ids in enumerate(sequences)
                   for start in range(0, len(ids), self.context - 1)]
        nll, counts = [0.0] * len(sequences), [len(ids) for ids in sequences]
        pad = self.tokenizer.eos_id
        for low in range(0, len(windows), self.batch_size):
            chunk = windows[low:low + self.batch_size]
            width = 1 + max(len(ids) for _, ids in chunk)
            inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
            valid = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
            for row, (_, ids) in enumerate(chunk):
                inputs[row, 0] = self.tokenizer.bos_id
                inputs[row, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
                valid[row, :len(ids)] = True
            inputs = inputs.to(self.device)
            token_nll = self._nll(self._logits(inputs[:, :-1]), inputs[:, 1:]).double().cpu()
            row_nll = (token_nll * valid).sum(dim=1)
            for row, (owner, _) in enumerate(chunk):
                nll[owner] += float(row_nll[row])
        return nll, counts

    def sequences_from_samples(self, samples: torch.Tensor, tokenizer) -> list[list[int]]:
        """The ids to score for each sample (BOS dropped): the sampled ids when the tokenizers
        are the same, re-encoded text otherwise."""
        rows = [row[1:] if row and row[0] == tokenizer.bos_id else row for row in samples.tolist()]
        if same_tokenizer(tokenizer, self.tokenizer):
            return rows
        sequences = []
        for row in rows:
            documents, current = [], []
            for token in row:
                if token == tokenizer.eos_id:
                    documents.append(current)
                    current = []
                else:
                    current.append(token)
            documents.append(current)
            pieces = self.tokenizer.encode_batch([tokenizer.decode(ids) for ids in documents])
            ids = []
            for index, piece in enumerate(pieces):
                ids += ([self.tokenizer.eos_id] if index else []) + piece
            sequences.append(ids)
        return sequences


def same_tokenizer(a, b) -> bool:
    return _fingerprint(a) is not None and _fingerprint(a) == _fingerprint(b)


def _fingerprint(tokenizer):
    ids = (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None))
    if getattr(tokenizer, "kind", "") == "gpt2":
        return ("gpt2", ids)
    inner = getattr(tokenizer, "tokenizer", None)
    if hasattr(inner, "to_str"):  # a `tokenizers.Tokenizer`: its full serialisation
        return (inner.to_str(), ids)
    return None


class RunEvaluator(Evaluator):
    """One of our autoregressive runs or pretrained directories."""

    def __init__(self, directory: str | Path, *, device="cpu", batch_size: int = 32, weights: str | None = None):
        directory = Path(directory)
        model, _ = load_pretrained_dir(directory, weights)
        if model.config.kind != "ar":
            raise ArgumentError(f"the evaluator {directory} is a {model.config.kind} model; generative perplexity "
                                f"needs an autoregressive one (train one with --preset ar-small, or use hf:gpt2-large)")
        if not (directory / TOKENIZER_DIR).is_dir():
            raise ArgumentError(f"the evaluator {directory} has no tokenizer/ directory")
        self.name, self.device, self.batch_size = str(directory), torch.device(device), batch_size
        self.model = model.to(self.device).eval()
        self.tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
        self.context = model.config.length

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, check_inputs=False)

    def _nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_nll(logits, targets, self.model.config.mask_token_id)


class _TransformersTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if self.eos_id is None or self.bos_id is None:
            raise ArgumentError(f"the evaluator's tokenizer {tokenizer.name_or_path} has neither a BOS nor an EOS "
                                "token")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class HuggingFaceEvaluator(Evaluator):
    """Any causal LM `transformers` can load by name or path (the paper: gpt2-large)."""

    def __init__(self, name: str, *, device="cpu", batch_size: int = 8):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise MissingDependency(f"the evaluator hf:{name} needs transformers: pip install -e \".[hf]\"") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name)
        except OSError as error:
            raise ArgumentError(f"cannot load the evaluator hf:{name} (offline, or no such model?): "
                                f"{str(error).splitlines()[0]}") from None
        self.name, self.device, self.batch_size = f"hf:{name}", torch.device(device), batch_size
        self.model = model.to(self.device).eval()
        self.tokenizer = _TransformersTokenizer(tokenizer)
        config = model.config
        self.context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs).logits


def ratio_stderr(sums: list[float], counts: list[int]) -> float:
    """Standard error of sum(sums) / sum(counts), the per-token mean over samples of different
    lengths, by the delta method: sqrt(sum((s_i - m c_i)^2) / (n (n - 1))) / mean(c)."""
    n = len(sums)
    if n < 2:
        return 0.0
    mean = sum(sums) / sum(counts)
    spread = sum((s - mean * c) ** 2 for s, c in zip(sums, counts)) / (n * (n - 1))
    return math.sqrt(spread) / (sum(counts) / n)


def load_evaluator(spec: str, *, device="cpu", batch_size: int | None = None) -> Evaluator:
    """`hf:NAME` for a Hugging Face causal LM, otherwise the path of an AR run."""
    if spec.startswith("hf:"):
        return HuggingFaceEvaluator(spec[3:], device=device, batch_size=batch_size or 8)
    return RunEvaluator(spec, device=device, batch_size=batch_size or 32)


def generative_perplexity(model, tokenizer, evaluator: Evaluator, *, num_samples: int,
                          settings: SamplerSettings = SamplerSettings(), batch_size: int = 32, seed: int = 0,
                          length: int | None = None, autocast=contextlib.nullcontext,
                          compile: str | None = None) -> GenerativeResult:
    """Draw `num_samples` unconditional samples (after a BOS) as `settings` say and score them with
    `evaluator`. `autocast` makes the context manager the sampling runs under; `compile` a
    torch.compile mode for the network (see `pgm.sampling.iterate_pgm`)."""
    length = length or model.config.length
    settings = settings.resolve(model.config.kind, "text", unknown=length - 1, compile=compile)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples, seconds = [], 0.0
    for low in range(0, num_samples, batch_size):
        rows = min(batch_size, num_samples - low)
        known = torch.zeros(rows, length, dtype=torch.long)
        known[:, 0] = tokenizer.bos_id
        known_mask = torch.zeros_like(known, dtype=torch.bool)
        known_mask[:, 0] = True
        synchronize(device)
        started = time.perf_counter()
        with autocast():
            tokens = run_to_end(iterate_text(model, known_tokens=known, known_mask=known_mask, settings=settings,
                                             generator=generator, compile=compile))
        synchronize(device)
        seconds += time.perf_counter() - started
        samples.append(tokens.cpu())
    samples = torch.cat(samples)
    nll, counts = evaluator.score(evaluator.sequences_from_samples(samples, tokenizer))
    entropies = [unigram_entropy(row[1:]) for row in samples.tolist()]
    total = sum(counts)
    return GenerativeResult(perplexity=math.exp(sum(nll) / total), nll=sum(nll) / total,
                            nll_stderr=ratio_stderr(nll, counts), evaluator_tokens=total,
                            entropy=sum(entropies) / len(entropies), num_samples=num_samples, steps=settings.steps,
                            generated_tokens=num_samples * (length - 1), sampling_seconds=seconds)
