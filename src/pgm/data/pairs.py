"""Fine-tuning data (`data.format=pairs`): (prompt, response) records, one per row

    [BOS] prompt response [EOS] [EOS] ...

with the number of leading given tokens (BOS + prompt) stored beside the row lengths
(`NAME.bin.given.npy`), so that every objective keeps the prompt clean and unscored (see
`pgm.objectives.losses.always_clean_mask`). The row's valid length ends at the response's EOS:
evaluation scores the response and that EOS. Training also learns the EOS that fill the row
(LLaDA's recipe), so that a sampler, which fills every position of a row, learns where an answer
ends. A pair too long for its row loses the end of its response (and its EOS: the response did not
end there) or, with `data.too_long=refuse`, is refused.

Sources: a `.jsonl` file or a folder of them, each line an object with the prompt and response
fields, or "builtin": the copy task built from the built-in corpus's words (`copy_task_pairs`).
Every `val_every`-th pair is held out for validation.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..formats import DATA_DIR, TOKENIZER_DIR, replaced_directory, write_json
from .config import DataConfig
from .corpus import BUILTIN, builtin_documents
from .packing import ShardWriter, dtype_for
from .tokenizers import Tokenizer, build_tokenizer

COPY_PROMPT = "Repeat: {phrase}\nAnswer:"
COPY_TASK_PAIRS = 20_000
COPY_TASK_WORDS = 100


def copy_task_pairs(count: int = COPY_TASK_PAIRS, seed: int = 0) -> list[tuple[str, str]]:
    """The built-in pairs task: three of the built-in corpus's 100 most frequent words, to be
    repeated (frequent words are one token each in a BPE trained on the corpus, or in GPT-2's, so
    each answer sits at a fixed distance from its question). A model trained on the corpus alone
    continues the prompt as prose; answering it takes the fine-tuning."""
    counts = collections.Counter(re.findall(r"\b[a-z]{2,}\b", "\n".join(builtin_documents())))
    words = sorted(word for word, _ in counts.most_common(COPY_TASK_WORDS))
    generator = np.random.default_rng(seed)
    phrases = [" ".join(words[i] for i in row) for row in generator.integers(0, len(words), size=(count, 3))]
    return [(COPY_PROMPT.format(phrase=phrase), " " + phrase) for phrase in phrases]


def _jsonl_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            raise DataError(f"{path} holds no .jsonl files of pairs")
        return files
    if not path.is_file():
        raise DataError(f"the pairs source {source} does not exist")
    if path.suffix != ".jsonl":
        raise DataError(f"pairs are read from .jsonl files (one object per line), not {path.name}")
    return [path]


def read_pairs(config: DataConfig) -> list[tuple[str, str]]:
    """The (prompt, response) pairs of `config.source`, in order; `limit_documents` keeps the first N."""
    if config.source == BUILTIN:
        pairs = copy_task_pairs()
    else:
        pairs = []
        fields = (config.prompt_field, config.response_field)
        for path in _jsonl_files(config.source):
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path}:{number} is not valid JSON ({error.msg})") from None
                    missing = [f for f in fields if not isinstance(record, dict) or not isinstance(record.get(f), str)]
                    if missing:
                        raise DataError(f"{path}:{number} has no text field {missing[0]!r} (a pair needs "
                                        f"{fields[0]!r} and {fields[1]!r}: set data.prompt_field / "
                                        "data.response_field)")
                    pairs.append((record[fields[0]], record[fields[1]]))
    if config.limit_documents:
        pairs = pairs[:config.limit_documents]
    if not pairs:
        raise DataError(f"the pairs source {config.source} holds no pairs")
    return pairs


def pack_pairs(prompts: list[np.ndarray], responses: list[np.ndarray], length: int, tokenizer: Tokenizer,
               too_long: str, first_index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(rows [n, length], valid lengths [n], given counts [n], pairs cut) of tokenized pairs."""
    dtype = dtype_for(tokenizer.model_vocab_size)
    rows = np.full((len(prompts), length), tokenizer.eos_id, dtype=dtype)
    lengths = np.empty(len(prompts), dtype=np.int32)
    given = np.empty(len(prompts), dtype=np.int32)
    cut = 0
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        room = length - 1 - len(prompt)  # after the BOS and the prompt: the response and its EOS
        if room < 2 or (len(response) + 1 > room and too_long == "refuse"):
            reason = ("its prompt leaves no room for a response" if room < 2 else
                      "it does not fit (data.too_long=refuse; cut would cut its response's end)")
            raise DataError(f"pair {first_index + row} has {len(prompt)} prompt and {len(response)} response tokens: "
                            f"{reason} in rows of length {length}")
        body = np.concatenate([[tokenizer.bos_id], prompt, response[:room], [tokenizer.eos_id]])[:length]
        cut += len(response) + 1 > room
        rows[row, :len(body)] = body
        lengths[row], given[row] = len(body), 1 + len(prompt)
    return rows, lengths, given, cut


def prepare_pairs(config: DataConfig, length: int, directory: Path, *, tokenizer: Tokenizer | None = None,
                  log=print) -> dict:
    """Tokenize and pack the pairs of `config` into `directory` (tokenizer/ and data/, each renamed
    into place when complete); returns the data's meta. `tokenizer`: encode with it (a run that
    starts from another model's weights) instead of the one `config` describes."""
    pairs = read_pairs(config)
    if tokenizer is None:
        texts = [prompt + response for prompt, response in pairs]
        tokenizer = build_tokenizer(config.tokenizer, texts, config.vocab_size, config.gpt2_file or None)
    held_out = np.arange(len(pairs)) % config.val_every == config.val_every - 1
    if held_out.all() or not held_out.any():
        raise DataError(f"{len(pairs)} pair(s) give no training or no validation split with "
                        f"data.val_every={config.val_every}: use more pairs")
    prompts = tokenizer.encode_each([prompt for prompt, _ in pairs])
    responses = tokenizer.encode_each([response for _, response in pairs])
    rows, lengths, given, cut = pack_pairs(prompts, responses, length, tokenizer, config.too_long)
    dtype = dtype_for(tokenizer.model_vocab_size)
    splits = {}
    with replaced_directory(directory / TOKENIZER_DIR) as temporary:
        tokenizer.save(temporary)
    with replaced_directory(directory / DATA_DIR) as data_dir:
        for name, chosen in (("train", ~held_out), ("val", held_out)):
            writer = ShardWriter(data_dir, name, 0, length, dtype, padded=True)
            writer.write(rows[chosen], lengths[chosen], given[chosen])
            entry = writer.close()
            splits[name] = {"shards": [entry["name"]], "rows": entry["rows"], "documents": entry["rows"],
                            "characters": sum(len(p) + len(r) for (p, r), out in zip(pairs, held_out)
                                              if out == (name == "val")),
                            "tokens": int((lengths[chosen] - given[chosen]).sum())}
        meta = {"recipe": config.recipe(length), "length": length, "train_rows": splits["train"]["rows"],
                "val_rows": splits["val"]["rows"], "splits": splits, "pairs_cut": cut,
                "unigram_val_nll": _response_unigram_nll(rows, lengths, given, held_out,
                                                         tokenizer.model_vocab_size)}
        write_json(data_dir / "meta.json", meta)
    log(f"data: {splits['train']['rows']} training and {splits['val']['rows']} validation pairs in rows of "
        f"{length} tokens ({splits['train']['tokens'] + splits['val']['tokens']} response tokens"
        + (f"; {cut} response(s) cut at the row's end" if cut else "") + ")")
    return meta


def _response_unigram_nll(rows, lengths, given, held_out, vocab_size: int) -> float:
    """Nats per validation response token (what the models are scored on) of the add-one-smoothed
    unigram distribution of the training responses."""
    positions = np.arange(rows.shape[1])[None, :]
    scored = (positions >= given[:, None]) & (positions < lengths[:, None])
    counts = np.ones(vocab_size) + np.bincount(rows[scored & ~held_out[:, None]], minlength=vocab_size)
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[rows[scored & held_out[:, None]]].mean())
