"""Text data prepared once: a corpus streamed into row shards in bounded memory, in parallel,
resumably (`pgm prepare`, and a run that prepares its own data).

A data directory holds `tokenizer/` and `data/`: the row shards of each split, and `meta.json`
(the recipe, the counts, the unigram statistic), written last: a directory is usable once its
meta is there. On the way, `data/progress.json` records after every checkpoint what is finished
(the shards, where each source stream stands, the packers' carried tokens); a rerun of the same
recipe continues from it and writes the same bytes as an uninterrupted run.

How it runs: the main process reads the sources as units (`corpus.open_source`), `workers`
processes decode, chunk and tokenize the units, and the main process takes their results back in
the units' order, decides the split of each piece (`PieceSplitter`), packs rows and writes them.
The rows depend only on the order of the pieces, never on the number of workers. Memory: about
2 x workers units in flight (UNIT_CHARS of text each, with their tokens), plus the open shards'
write buffers; never the corpus (the held-out last pieces of `data.val_last` are found again in
the written rows, not kept). The BPE is trained on the first `data.bpe_sample_chars` characters
of training text, which it holds in memory.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, ResourceError
from ..formats import DATA_DIR, TOKENIZER_DIR, make_directory, remove_partial, replaced_directory, write_json
from .config import DataConfig, normalised_recipe, recipe_differences
from .corpus import PieceSplitter, Unit, open_source, pieces_of, unit_size
from .packing import RowPacker, ShardWriter, TokenRows, dtype_for, remove_shard, truncate_shard, with_eos
from .tokenizers import Tokenizer, build_tokenizer, load_tokenizer


class PreparationStopped(ResourceError):
    """A preparation that stopped for a reason outside its data; what it finished is kept."""


META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
SHARD_BYTES = 128 << 20  # a checkpoint (both splits' open shards closed) once this much is written
SPLITS = ("train", "val")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepared_meta(directory: Path) -> dict | None:
    """The meta of the finished data in `directory` (a data or run directory), or None."""
    try:
        meta = json.loads((Path(directory) / DATA_DIR / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def same_recipe(a, b) -> bool:
    a, b = normalised_recipe(a), normalised_recipe(b)
    return a is not None and a == b


# --- the workers -------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
    """A unit's pieces, tokenized: `tokens`, each piece followed by EOS; `lengths` and `characters`
    per piece (the lengths without the EOS)."""

    stream: str
    index: int
    tokens: np.ndarray
    lengths: np.ndarray
    characters: np.ndarray
    consumed: float
    seconds: float  # the worker's time on it
    end: bool = False  # marks the end of its stream (no pieces)


_WORKER: dict = {}


def _start_worker(parent: int, tokenizer_dir: str, text_field: str, chunk_chars: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process answers an interrupt for everyone
    _die_with(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_dir), text_field=text_field, chunk_chars=chunk_chars)


def _die_with(parent: int) -> None:
    """Ask Linux to kill this worker when its parent dies: a killed preparation leaves no workers
    waiting for units that will never come."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before the request
        os._exit(1)


def encode_unit(unit: Unit) -> Encoded:
    started = time.perf_counter()
    tokenizer = _WORKER["tokenizer"]
    pieces = pieces_of(unit, _WORKER["text_field"], _WORKER["chunk_chars"])
    ids = tokenizer.encode_each(pieces)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    characters = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    tokens = with_eos(ids, tokenizer.eos_id, dtype_for(tokenizer.model_vocab_size))
    return Encoded(unit.stream, unit.index, tokens, lengths, characters, unit.consumed, time.perf_counter() - started)


# --- what a checkpoint records -----------------------------------------------------------------


@dataclasses.dataclass
class SplitState:
    shards: list = dataclasses.field(default_factory=list)  # [{"name", "rows"}], complete
    carry: list = dataclasses.field(default_factory=list)  # the wrapped stream's tokens not yet in a row
    position: int = 0  # the stream's length so far (wrap) or the rows made (pad)
    documents: int = 0
    characters: int = 0
    tokens: int = 0

    @property
    def rows(self) -> int:
        return sum(shard["rows"] for shard in self.shards)


@dataclasses.dataclass
class Progress:
    recipe: dict
    shard_bytes: int
    unit_chars: int
    next_unit: dict = dataclasses.field(default_factory=lambda: {"train": 0, "val": 0})
    finished_streams: list = dataclasses.field(default_factory=list)
    pieces_seen: int = 0  # of the training stream, for the split and data.limit_documents
    train: SplitState = dataclasses.field(default_factory=SplitState)
    val: SplitState = dataclasses.field(default_factory=SplitState)
    # The last training pieces (at most max(val_last, 1)): where each starts, its characters, its tokens
    tail: list = dataclasses.field(default_factory=lambda: [[], [], []])
    moved_tail: int = -1  # after the streams: the training rows kept once the tail moved to validation
    sources: dict = dataclasses.field(default_factory=dict)  # stream -> what identified its content

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Progress":
        splits = {name: SplitState(**values[name]) for name in SPLITS}
        return cls(**{**values, **splits})


# --- the preparation ---------------------------------------------------------------------------


class _Timer:
    """Seconds spent in each stage of the main process."""

    def __init__(self):
        self.seconds = dict.fromkeys(("read", "wait", "pack", "write", "finish"), 0.0)

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


class Preparation:
    """One preparation of text data into `directory` (see the module's docstring)."""

    def __init__(self, config: DataConfig, length: int, directory: Path, *, tokenizer: Tokenizer | None = None,
                 workers: int | None = None, log=print, progress: bool = False, shard_bytes: int | None = None,
                 unit_chars: int | None = None, replace: bool = False):
        if length < 3:
            raise ConfigError(f"rows of length {length} leave no room between BOS and EOS")
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        self.config, self.length, self.directory = config, length, Path(directory)
        self.data_dir = self.directory / DATA_DIR
        self.given_tokenizer, self.workers = tokenizer, workers or usable_cores()
        self.log, self.show_progress, self.replace = log, progress, replace
        self.shard_bytes, self.unit_chars = shard_bytes or SHARD_BYTES, unit_size(unit_chars)
        self.recipe = config.recipe(length)
        self.timer = _Timer()
        self.worker_seconds = 0.0

    # --- set-up ---

    def run(self) -> dict:
        """Prepare (or finish preparing) the data; returns its meta."""
        make_directory(self.data_dir)
        with self._locked():
            meta = prepared_meta(self.directory)
            if meta is not None and same_recipe(meta.get("recipe"), self.recipe):
                (self.data_dir / PROGRESS_FILE).unlink(missing_ok=True)  # a kill between the two
                return meta
            if meta is not None:
                self._clear_or_refuse(meta.get("recipe"), "holds data prepared with another recipe")
            self.state = self._resume_or_start()
            self._stream()
            return self._finish()

    @contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # no advisory locks here: the caller keeps to one preparation at a time
            yield
            return
        with open(self.data_dir / LOCK_FILE, "w") as handle:
            try:  # a record lock: the process's own, not inherited by its workers, gone when it dies
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise DataError(f"another process is preparing data in {self.directory}; wait for it to "
                                    "finish") from None
                self.log(f"data: {self.data_dir} cannot be locked ({error.strerror}): make sure that no other "
                         "process prepares it at the same time")
            yield

    def _clear_or_refuse(self, recipe, what: str) -> None:
        if not self.replace:
            differences = "; ".join(recipe_differences(self.recipe, recipe or {})) or "an unreadable recipe"
            raise DataError(f"{self.directory} {what} ({differences}): choose another --out, or delete it")
        for path in self.data_dir.iterdir():
            if path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _resume_or_start(self) -> Progress:
        remove_partial(self.directory)
        path = self.data_dir / PROGRESS_FILE
        try:
            progress = Progress.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            progress = None
        if progress is not None and not same_recipe(progress.recipe, self.recipe):
            self._clear_or_refuse(progress.recipe, "holds a preparation of another recipe")
            progress = None
        if progress is not None and (self.directory / TOKENIZER_DIR).is_dir():
            self.tokenizer = load_tokenizer(self.directory / TOKENIZER_DIR)
            self._remove_unrecorded_shards(progress)
            self.log(f"data: continuing the preparation in {self.directory} ({progress.train.rows} training rows "
                     "done)")
            return progress
        self._remove_unrecorded_shards(None)
        self.tokenizer = self._build_tokenizer()
        with replaced_directory(self.directory / TOKENIZER_DIR) as temporary:
            self.tokenizer.save(temporary)
        progress = Progress(self.recipe, self.shard_bytes, self.unit_chars)
        self._save(progress)
        return progress

    def _remove_unrecorded_shards(self, progress: Progress | None) -> None:
        """What a killed preparation left after its last checkpoint: shards in flight (and their
        files beside them), and temporary files."""
        recorded = set() if progress is None else {shard["name"] for name in SPLITS
                                                   for shard in getattr(progress, name).shards}
        for path in self.data_dir.iterdir():
            shard = path.name.partition(".bin")
            if path.name.startswith(".") and ".tmp-" in path.name or shard[1] and shard[0] + ".bin" not in recorded:
                path.unlink(missing_ok=True)

    def _build_tokenizer(self) -> Tokenizer:
        config = self.config
        if self.given_tokenizer is not None:
            return self.given_tokenizer
        if config.tokenizer != "bpe":
            return build_tokenizer(config.tokenizer, [], config.vocab_size, config.gpt2_file or None)
        sample = training_sample(config)
        self.log(f"data: training a BPE of {config.vocab_size} tokens on {sum(map(len, sample)) / 1e6:.1f}M "
                 "characters of training text")
        tokenizer = build_tokenizer("bpe", sample, config.vocab_size, None)
        if tokenizer.vocab_size < config.vocab_size:
            raise DataError(f"the training text yields a BPE of only {tokenizer.vocab_size} tokens, fewer than "
                            f"data.vocab_size={config.vocab_size}: set data.vocab_size={tokenizer.vocab_size} or "
                            "less, or use more text")
        return tokenizer

    def _save(self, progress: Progress) -> None:
        write_json(self.data_dir / PROGRESS_FILE, progress.to_dict())

    # --- streaming ---

    def _streams(self):
        config = self.config
        options = dict(text_field=config.text_field, revision=config.revision, streaming=config.streaming,
                       chunk_chars=config.chunk_chars, unit_chars=self.state.unit_chars)
        yield "train", lambda: open_source(config.source, "train", split=config.split, **options)
        if config.val_source:
            yield "val", lambda: open_source(config.val_source, "val", split=config.val_split, **options)

    def _units(self):
        """The units still to do, each stream's ended by an `Encoded` end marker; a training stream
        stops early once data.limit_documents pieces are in."""
        for stream, opened in self._streams():
            if stream in self.state.finished_streams:
                continue
            source = opened()
            self.totals[stream] = source.total
            recorded = self.state.sources.setdefault(stream, source.identity)
            if recorded != source.identity:
                raise DataError(f"the {'training' if stream == 'train' else 'validation'} source changed since this "
                                f"preparation began (files added, removed or modified): delete {self.directory} to "
                                "prepare it anew")
            index = 0
            for unit in source.units:
                if stream == "train" and self.splitter.done:
                    break
                if index >= self.state.next_unit[stream]:
                    unit.index = index
                    yield unit
                index += 1
            yield Encoded(stream, index, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                          0.0, 0.0, end=True)

    def _stream(self) -> None:
        state, config = self.state, self.config
        self.splitter = PieceSplitter(config.val_every, config.val_last, config.limit_documents,
                                      separate_validation=bool(config.val_source), seen=state.pieces_seen)
        tk = self.tokenizer
        dtype = dtype_for(tk.model_vocab_size)
        self.packers = {name: RowPacker(config.packing, self.length, tk.bos_id, tk.eos_id, tk.pad_id, dtype,
                                        getattr(state, name).carry, getattr(state, name).position) for name in SPLITS}
        self.writers = {name: ShardWriter(self.data_dir, name, len(getattr(state, name).shards), self.length, dtype,
                                          config.packing == "pad") for name in SPLITS}
        self.totals, self.consumed, self.started = {}, {}, time.perf_counter()
        self.tail_size = max(config.val_last, 1)
        if set(state.finished_streams) >= {stream for stream, _ in self._streams()}:
            return
        bar = self._progress_bar()
        try:
            for encoded in self._encoded():
                with self.timer.stage("pack"):
                    packed = self._take(encoded)
                with self.timer.stage("write"):
                    for name, rows, valid in packed:
                        self.writers[name].write(rows, valid)
                if bar is not None:
                    self._show(bar)
                if sum(writer.bytes for writer in self.writers.values()) >= state.shard_bytes:
                    self._checkpoint()
            self._checkpoint()
        finally:
            for writer in self.writers.values():
                writer.abandon()
            if bar is not None:
                bar.close()

    def _encoded(self):
        """The units' encodings in order: in this process with one worker, else from a pool
        that holds at most 2 x workers units at a time."""
        units = self._timed_units()
        if self.workers == 1:
            _WORKER.update(tokenizer=self.tokenizer, text_field=self.config.text_field,
                           chunk_chars=self.config.chunk_chars)
            try:
                for unit in units:
                    yield unit if isinstance(unit, Encoded) else encode_unit(unit)
            finally:
                _WORKER.clear()
            return
        with self._pool() as pool:
            pending = []
            for unit in units:
                pending.append(unit if isinstance(unit, Encoded) else pool.submit(encode_unit, unit))
                while len(pending) >= 2 * self.workers:
                    yield self._result(pending.pop(0))
            while pending:
                yield self._result(pending.pop(0))

    @contextmanager
    def _pool(self):
        """The worker processes: forked where the system can (nothing to import again), each
        loading the saved tokenizer. TOKENIZERS_PARALLELISM is set while they start, so that a
        tokenizer that trained with threads here does not warn in every child."""
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        arguments = (os.getpid(), str(self.directory / TOKENIZER_DIR), self.config.text_field, self.config.chunk_chars)
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                       initializer=_start_worker, initargs=arguments)
            pool.submit(int).result()  # the workers start now, while the variable is set
        finally:
            if before is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        try:
            yield pool
        except BrokenProcessPool:
            raise PreparationStopped(f"a worker process died while tokenizing (out of memory?); run the same "
                                     f"command again to continue the preparation in {self.directory}") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _result(self, item) -> Encoded:
        if isinstance(item, Encoded):
            return item
        with self.timer.stage("wait"):
            return item.result()

    def _timed_units(self):
        units = self._units()
        while True:
            with self.timer.stage("read"):
                unit = next(units, None)
            if unit is None:
                return
            yield unit

    def _take(self, encoded: Encoded) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        """Split and pack the pieces of one unit (the next in order): (split, rows, valid lengths)
        to write."""
        state, packed = self.state, []
        self.worker_seconds += encoded.seconds
        if encoded.end:
            state.next_unit[encoded.stream] = encoded.index
            state.finished_streams.append(encoded.stream)
            return packed
        kept, held_out = self.splitter.held_out(encoded.stream, len(encoded.lengths))
        state.pieces_seen = self.splitter.seen
        lengths, characters = encoded.lengths[:kept], encoded.characters[:kept]
        tokens = encoded.tokens[:int(lengths.sum()) + kept]
        for name, chosen in (("train", ~held_out), ("val", held_out)):
            if not chosen.any():
                continue
            split, packer = getattr(state, name), self.packers[name]
            piece_lengths = lengths[chosen]
            if name == "train":
                self._remember_tail(packer.starts(piece_lengths), characters[chosen], piece_lengths)
            stream = tokens if chosen.all() else tokens[np.repeat(chosen, lengths + 1)]
            packed.append((name, *packer.pack(stream, piece_lengths)))
            split.documents += len(piece_lengths)
            split.characters += int(characters[chosen].sum())
            split.tokens += int(piece_lengths.sum())
        state.next_unit[encoded.stream] = encoded.index + 1
        self.consumed[encoded.stream] = encoded.consumed
        return packed

    def _remember_tail(self, starts, characters, lengths) -> None:
        tail = self.state.tail
        for column, new in enumerate((starts, characters, lengths)):
            tail[column] = np.concatenate([np.asarray(tail[column], dtype=np.int64), new])[-self.tail_size:]

    def _checkpoint(self) -> None:
        """Close both splits' open shards and record where everything stands."""
        state = self.state
        with self.timer.stage("write"):
            for name in SPLITS:
                entry = self.writers[name].close()
                if entry is not None:
                    getattr(state, name).shards.append(entry)
                getattr(state, name).carry = self.packers[name].carry.tolist()
                getattr(state, name).position = int(self.packers[name].position)
            state.tail = [np.asarray(column).tolist() for column in state.tail]
            self._save(state)

    # --- progress ---

    def _progress_bar(self):
        if not self.show_progress:
            return None
        from tqdm import tqdm

        return tqdm(desc="prepare", unit="B", unit_scale=True, file=sys.stderr, dynamic_ncols=True)

    def _show(self, bar) -> None:
        totals = [self.totals.get(stream) for stream, _ in self._streams()]
        if bar.total is None and None not in totals:
            bar.total = sum(totals)
        done = sum(self.consumed.values())
        bar.update(done - bar.n)
        bar.set_postfix_str(self.where_the_time_goes(), refresh=False)

    def where_the_time_goes(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        share = {name: 100 * seconds / elapsed for name, seconds in self.timer.seconds.items()}
        busy = 100 * self.worker_seconds / elapsed / self.workers
        return (f"read {share['read']:.0f}%, tokenize {self.workers}x{busy:.0f}%, pack {share['pack']:.0f}%, "
                f"write {share['write']:.0f}%, finish {share['finish']:.0f}% (waiting {share['wait']:.0f}%)")

    # --- the end ---

    def _finish(self) -> dict:
        with self.timer.stage("finish"):
            meta = self._finished_meta()
        t, v = self.state.train, self.state.val
        self.log(f"data: {t.documents} training and {v.documents} validation documents ({t.characters / 1e6:.1f}M / "
                 f"{v.characters / 1e6:.2f}M characters), {t.tokens + v.tokens} tokens, in "
                 f"{time.perf_counter() - self.started:.1f} s with {self.workers} worker(s): {self.where_the_time_goes()}")
        self.log(f"data: {t.rows} training rows and {v.rows} validation rows of {self.length} tokens; unigram "
                 f"perplexity {math.exp(meta['unigram_val_nll']):.1f}")
        return meta

    def _finished_meta(self) -> dict:
        """Move the held-out tail, check the splits, count the unigram statistic, write the meta."""
        state = self.state
        if state.moved_tail < 0:
            tail = self.splitter.tail_pieces(state.train.documents, state.val.documents)
            if tail:
                self._move_tail(tail)
        if state.moved_tail >= 0:
            self._truncate_training_rows(state.moved_tail)
        for name in SPLITS:
            if getattr(state, name).rows == 0:
                raise DataError(f"the {name} split yields no rows of length {self.length}: use more text or a "
                                "shorter length")
        meta = {"recipe": self.recipe, "length": self.length, "train_rows": state.train.rows,
                "val_rows": state.val.rows, "splits": {name: self._describe(name) for name in SPLITS}}
        train, val = (TokenRows([self.data_dir / s["name"] for s in getattr(state, name).shards]) for name in SPLITS)
        meta["unigram_val_nll"] = unigram_nll(train, val, self.tokenizer.model_vocab_size)
        write_json(self.data_dir / META_FILE, meta)
        (self.data_dir / PROGRESS_FILE).unlink(missing_ok=True)
        return meta

    def _describe(self, name: str) -> dict:
        split = getattr(self.state, name)
        return {"shards": [shard["name"] for shard in split.shards], "rows": split.rows,
                "documents": split.documents, "characters": split.characters, "tokens": split.tokens}

    def _move_tail(self, count: int) -> None:
        """Make the last `count` training pieces the validation split (data.val_last, or the one
        piece held out of a corpus too small to give one of every val_every): their tokens are
        read back from the training rows already written, and packed anew."""
        state, tk = self.state, self.tokenizer
        starts, characters, tokens = (np.asarray(column, dtype=np.int64)[-count:] for column in state.tail)
        first = int(starts[0])
        rows = TokenRows([self.data_dir / shard["name"] for shard in state.train.shards])
        dtype = dtype_for(tk.model_vocab_size)
        packer = RowPacker(self.config.packing, self.length, tk.bos_id, tk.eos_id, tk.pad_id, dtype)
        writer = ShardWriter(self.data_dir, "val", len(state.val.shards), self.length, dtype,
                             self.config.packing == "pad")
        body = self.length - 2
        keep = first if packer.padded else first // body
        skip = 0 if packer.padded else first - keep * body  # where the tail starts in row `keep`'s body
        for chunk, lengths in rows.chunks(start=keep):
            if packer.padded:
                writer.write(chunk, lengths)
            else:
                writer.write(packer.wrap(chunk[:, 1:-1].ravel()[skip:]))
                skip = 0
        if not packer.padded:  # the carry continues the stream after the last row
            carry = np.asarray(state.train.carry, dtype=dtype)
            writer.write(packer.wrap(carry[max(0, first - len(rows) * body):]))
        entry = writer.close()
        if entry is not None:
            state.val.shards.append(entry)
        state.val.documents += count
        state.val.characters += int(characters.sum())
        state.val.tokens += int(tokens.sum())
        state.train.documents -= count
        state.train.characters -= int(characters.sum())
        state.train.tokens -= int(tokens.sum())
        state.moved_tail = keep
        self._save(state)

    def _truncate_training_rows(self, keep: int) -> None:
        """Keep the first `keep` training rows: those made of training pieces alone."""
        state, start, kept = self.state, 0, []
        for shard in state.train.shards:
            path = self.data_dir / shard["name"]
            if start >= keep:
                remove_shard(path)
            elif start + shard["rows"] > keep:
                truncate_shard(path, keep - start)
                kept.append({**shard, "rows": keep - start})
            else:
                kept.append(shard)
            start += shard["rows"]
        state.train.shards = kept
        self._save(state)


def modeled_tokens(tokens: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """The tokens of rows that a model is scored on: every valid position but the leading BOS."""
    if lengths is None:
        return tokens[:, 1:].ravel()
    return tokens[:, 1:][np.arange(1, tokens.shape[1])[None, :] < lengths[:, None]]


def unigram_nll(train: TokenRows, val: TokenRows, vocab_size: int) -> float:
    """Nats per validation token of the add-one-smoothed unigram distribution of the training
    tokens, counted a chunk of rows at a time."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for tokens, lengths in train.chunks():
        counts += np.bincount(modeled_tokens(tokens, lengths), minlength=vocab_size)
    log_probs = np.log(counts / counts.sum())
    total, count = 0.0, 0
    for tokens, lengths in val.chunks():
        modeled = modeled_tokens(tokens, lengths)
        total -= float(log_probs[modeled].sum())
        count += len(modeled)
    return total / count


def training_sample(config: DataConfig) -> list[str]:
    """The first `config.bpe_sample_chars` characters of training pieces (whole pieces), read in
    this process; pieces that the end of the stream would hold out are left out."""
    splitter = PieceSplitter(config.val_every, config.val_last, config.limit_documents,
                             separate_validation=bool(config.val_source))
    sample, characters, held = [], 0, 0
    ahead = max(config.val_last, 1)  # pieces past the sample that prove none of it is the held-out tail
    source = open_source(config.source, "train", text_field=config.text_field, split=config.split,
                         revision=config.revision, streaming=config.streaming, chunk_chars=config.chunk_chars)
    ended = True
    for unit in source.units:
        pieces = pieces_of(unit, config.text_field, config.chunk_chars)
        first = splitter.seen
        kept, held_out = splitter.held_out("train", len(pieces))
        held += int(held_out.sum())
        for index, (piece, out) in enumerate(zip(pieces[:kept], held_out), first):
            if not out and characters < config.bpe_sample_chars:
                sample.append((index, piece))
                characters += len(piece)
        if splitter.done or (characters >= config.bpe_sample_chars and sample and splitter.seen > sample[-1][0] + ahead):
            ended = splitter.done
            break
    if ended and not config.val_source:  # a separate validation source holds nothing out of this one
        tail = splitter.tail_pieces(splitter.seen - held, held)
        sample = [(index, piece) for index, piece in sample if index < splitter.seen - tail]
    return [piece for _, piece in sample]


def prepare_text(config: DataConfig, length: int, directory: Path, **options) -> dict:
    """Prepare text data into `directory` (see `Preparation` for the options); returns its meta."""
    return Preparation(config, length, directory, **options).run()
