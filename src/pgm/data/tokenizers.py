"""Tokenizers: a byte-level BPE trained on the training split, GPT-2's BPE, or a Hugging Face one.

All expose the same small interface and save themselves into a run directory. The model's
vocabulary is the tokenizer's plus, where the tokenizer has none, a mask id appended at the end
(GPT-2: 50257 ids + mask 50257 -> 50258, as in the released checkpoints).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..formats import TOKENIZER_CONFIG, make_directory, write_json
from .image_rows import load_image_tokenizer

GPT2_FILE = "gpt2.tiktoken"
# GPT-2's pre-tokenisation pattern, as tiktoken defines it for the "gpt2"/"r50k_base" encodings.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """kind, vocab_size (ids the tokenizer emits), bos/eos/pad/mask ids; encode, decode, save."""

    kind = ""

    def __init__(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, mask_id: int):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.mask_id = vocab_size, bos_id, eos_id, pad_id, mask_id

    @property
    def model_vocab_size(self) -> int:
        return max(self.vocab_size, self.mask_id + 1)

    @property
    def special_ids(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.pad_id, self.mask_id}

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_each(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text as an array, on this thread alone (a worker of a preparation is one
        core)."""
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _config(self) -> dict:
        return {"type": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "mask_id": self.mask_id}

    def identity(self) -> dict:
        """What two tokenizers must share to encode every text alike."""
        return self._config()

    def save(self, directory: Path) -> None:
        make_directory(directory)
        write_json(directory / TOKENIZER_CONFIG, self._config())


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`: our trained byte-level BPE (kind "bpe") or a pretrained one
    such as bert-base-uncased (kind "huggingface"), encoded without its special tokens."""

    def __init__(self, tokenizer, kind: str, bos_id: int, eos_id: int, pad_id: int, mask_id: int, name: str = ""):
        super().__init__(tokenizer.get_vocab_size(), bos_id, eos_id, pad_id, mask_id)
        self.tokenizer, self.kind, self.name = tokenizer, kind, name

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.special_ids])

    def _config(self) -> dict:
        return {**super()._config(), "name": self.name}

    def identity(self) -> dict:
        return {**super().identity(), "model": self.tokenizer.to_str()}

    def save(self, directory: Path) -> None:
        super().save(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))


def train_bpe(documents: list[str], vocab_size: int) -> HuggingFaceTokenizer:
    """A byte-level BPE with `<|endoftext|>` (BOS and EOS, id 0) and `<|pad|>` (id 1)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 260:
        raise DataError(f"a byte-level BPE needs a vocabulary of at least 260 (256 bytes + specials), got {vocab_size}")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return HuggingFaceTokenizer(tokenizer, "bpe", bos_id=0, eos_id=0, pad_id=1, mask_id=tokenizer.get_vocab_size())


def pretrained_tokenizer(name: str) -> HuggingFaceTokenizer:
    """A tokenizer from the Hugging Face Hub by name (network). BERT-style special tokens
    ([CLS], [SEP], [PAD], [MASK]) become BOS, EOS, pad and the mask id, as in the paper's LM1B setting."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_pretrained(name)
    except Exception as error:
        raise DataError(f"could not fetch the tokenizer {name!r} from the Hugging Face Hub: {error}") from None
    return _with_special_ids(tokenizer, name)


def _with_special_ids(tokenizer, name: str) -> HuggingFaceTokenizer:
    def find(*candidates):
        return next((i for i in map(tokenizer.token_to_id, candidates) if i is not None), None)

    bos, eos = find("[CLS]", "<s>", "<|endoftext|>"), find("[SEP]", "</s>", "<|endoftext|>")
    pad, mask = find("[PAD]", "<pad>", "<|pad|>"), find("[MASK]", "<mask>")
    if bos is None or eos is None:
        raise DataError(f"the tokenizer {name!r} has no recognisable BOS/EOS tokens")
    mask = tokenizer.get_vocab_size() if mask is None else mask
    return HuggingFaceTokenizer(tokenizer, "huggingface", bos, eos, eos if pad is None else pad, mask, name)


def find_gpt2_file(explicit: str | None = None) -> Path | None:
    """GPT-2's BPE ranks in tiktoken format, found offline: an explicit path, $PGM_GPT2_TIKTOKEN,
    or the copy inside an installed openai-whisper (located without importing it)."""
    for candidate in (explicit, os.environ.get("PGM_GPT2_TIKTOKEN")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise DataError(f"no GPT-2 BPE file at {path}")
            return path
    spec = importlib.util.find_spec("whisper")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "assets" / GPT2_FILE
        if path.is_file():
            return path
    return None


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE through tiktoken: 50257 ids, `<|endoftext|>` (50256) as BOS, EOS and pad, mask 50257."""

    kind = "gpt2"

    def __init__(self, file: str | Path | None = None):
        import tiktoken

        path = find_gpt2_file(str(file) if file else None)
        if path is not None:
            from tiktoken.load import load_tiktoken_bpe

            try:
                ranks = load_tiktoken_bpe(str(path))
            except Exception as error:
                raise DataError(f"{path} is not a tiktoken BPE file: {error}") from None
            self.encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                              special_tokens={"<|endoftext|>": len(ranks)})
        else:
            try:
                self.encoding = tiktoken.get_encoding("gpt2")
            except Exception:
                raise DataError("GPT-2's BPE could not be downloaded; pass data.gpt2_file=PATH to a gpt2.tiktoken file "
                                "(pip install --no-deps openai-whisper ships one) or set PGM_GPT2_TIKTOKEN") from None
        self.file = path
        eot = self.encoding.eot_token
        super().__init__(self.encoding.n_vocab, eot, eot, eot, self.encoding.n_vocab)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def encode_each(self, texts: list[str]) -> list[np.ndarray]:
        # Straight into arrays: 20% faster than encode_ordinary's lists, 40% than its batch's thread pool
        out = []
        for text in texts:
            try:
                out.append(self.encoding.encode_to_numpy(text, disallowed_special=()))
            except UnicodeEncodeError:  # lone surrogates, which encode_ordinary replaces first
                out.append(np.asarray(self.encoding.encode_ordinary(text), dtype=np.uint32))
        return out

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([i for i in ids if i < self.vocab_size and i != self.eos_id])

    def save(self, directory: Path) -> None:
        super().save(directory)
        if self.file is not None:
            shutil.copyfile(self.file, directory / GPT2_FILE)


def build_tokenizer(kind: str, train_documents: list[str], vocab_size: int, gpt2_file: str | None) -> Tokenizer:
    if kind == "bpe":
        return train_bpe(train_documents, vocab_size)
    if kind == "gpt2":
        return GPT2Tokenizer(gpt2_file)
    if kind.startswith("hf:"):
        return pretrained_tokenizer(kind[3:])
    raise DataError(f"unknown tokenizer {kind!r}: use bpe, gpt2 or hf:NAME")


def named_tokenizer(name: str, gpt2_file: str | None = None) -> Tokenizer:
    """A tokenizer known by name, as the authors' checkpoints record theirs: GPT-2's ("gpt2",
    "gpt2-large", ...: the same BPE, found offline or downloaded) or a Hugging Face one."""
    return GPT2Tokenizer(gpt2_file) if name.startswith("gpt2") else pretrained_tokenizer(name)


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in `directory`: a text tokenizer, the pixel tokenizer, or the layout of a
    VQ tokenizer's codes (`VQCodes`; its network is loaded by `pgm.vq_tokenizer`)."""
    directory = Path(directory)
    config_path = directory / TOKENIZER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{directory} holds no readable tokenizer ({TOKENIZER_CONFIG})") from None
    if config["type"] in ("pixels", "vq"):
        return load_image_tokenizer(directory, config)
    if config["type"] == "gpt2":
        local = directory / GPT2_FILE
        return GPT2Tokenizer(local if local.is_file() else None)
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    return HuggingFaceTokenizer(tokenizer, config["type"], config["bos_id"], config["eos_id"], config["pad_id"],
                                config["mask_id"], config.get("name", ""))
