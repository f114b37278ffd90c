"""`pgm prepare` and data prepared once: the rows are those of the split and packing rules applied
to the whole corpus at once, whatever the number of workers; a kill at any moment is resumed to the
same bytes; the recipe is checked; runs train from a prepared directory in place, on one machine or
two."""

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from pgm.data import DataConfig, load_prepared, prepare_data, training_and_validation_documents, unigram_nll
from pgm.data.corpus import PARAGRAPH_BREAK, builtin_documents, chunk_document, group_paragraphs, load_documents
from pgm.data.prepare import Preparation, encode_unit, prepare_text, training_sample
from pgm.data.tokenizers import train_bpe
from pgm.errors import DataError

ROW = 64


def corpus_documents(count: int = 260) -> list[str]:
    """Documents of 1-5 paragraphs of the built-in corpus (some longer than chunk_chars)."""
    paragraphs = [p for book in builtin_documents()[:2] for p in book.split("\n\n")][:4 * count]
    sizes = (np.arange(count) * 7919 % 5) + 1
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return ["\n\n".join(paragraphs[a:b]) for a, b in zip(starts[:-1], starts[1:])]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    documents = corpus_documents()
    with open(directory / "corpus.jsonl", "w") as handle:
        for document in documents:
            handle.write(json.dumps({"text": document}) + "\n")
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b"in", b" t", b" the", b"er", b"an"]
    (directory / "small.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in
                                                     enumerate(ranks)))
    return directory


def small_config(corpus, **changes) -> DataConfig:
    values = dict(source=str(corpus / "corpus.jsonl"), tokenizer="gpt2", gpt2_file=str(corpus / "small.tiktoken"),
                  chunk_chars=1500)
    return DataConfig(**{**values, **changes})


def prepare(config, directory, **options):
    options = {"workers": 1, "unit_chars": 20_000, "shard_bytes": 12_000, "log": lambda *a: None, **options}
    return prepare_text(config, ROW, directory, **options)


def data_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((directory / "data").iterdir()) if not p.name.startswith(".")}


def reference_rows(documents: list[str], tokenizer, packing: str) -> np.ndarray:
    """The rows of a split by the rule itself: documents in order, joined by EOS and cut into rows
    (wrap), or one per row (pad)."""
    body, rows, stream = ROW - 2, [], []
    for ids in tokenizer.encode_batch(documents):
        if packing == "pad":
            row = [tokenizer.bos_id, *ids[:body], tokenizer.eos_id]
            rows.append(row + [tokenizer.pad_id] * (ROW - len(row)))
            continue
        stream += [*ids, tokenizer.eos_id]
        while len(stream) >= body:
            rows.append([tokenizer.bos_id, *stream[:body], tokenizer.eos_id])
            stream = stream[body:]
    return np.array(rows)


def all_rows(split) -> np.ndarray:
    return np.concatenate([tokens for tokens, _ in split.chunks()]).astype(np.int64)


RECIPES = {
    "every 20th held out": dict(),
    "the last 30 held out, padded": dict(val_last=30, packing="pad"),
    "the last 50 held out, across shards": dict(val_last=50),
    "a separate validation source": dict(val_source="VAL"),
    "the first 40 pieces, one held out": dict(limit_documents=40, val_every=50),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_rows_follow_the_rules_whatever_the_number_of_workers(corpus, tmp_path, recipe):
    changes = dict(RECIPES[recipe])
    if changes.get("val_source") == "VAL":
        (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents(30)))
        changes["val_source"] = str(tmp_path / "val.jsonl")
    config = small_config(corpus, **changes)
    one = prepare(config, tmp_path / "one", workers=1)
    prepare(config, tmp_path / "three", workers=3)
    assert data_files(tmp_path / "one") == data_files(tmp_path / "three")  # the same bytes, shards and meta
    if not config.limit_documents:
        assert len(one["splits"]["train"]["shards"]) > 2  # the shards and units cut the corpus in many places
    prepared = load_prepared(tmp_path / "one")
    train_docs, val_docs = training_and_validation_documents(config)
    for split, documents in ((prepared.train, train_docs), (prepared.val, val_docs)):
        expected = reference_rows(documents, prepared.tokenizer, config.packing)
        assert np.array_equal(all_rows(split), expected)
    assert (one["splits"]["train"]["documents"], one["splits"]["val"]["documents"]) == (len(train_docs), len(val_docs))
    assert one["splits"]["val"]["characters"] == sum(map(len, val_docs))
    if config.packing == "pad":
        lengths = np.concatenate([lengths for _, lengths in prepared.val.chunks()])
        ids = prepared.tokenizer.encode_batch(val_docs)
        assert lengths.tolist() == [min(len(i), ROW - 2) + 2 for i in ids]


def test_the_unigram_statistic_is_the_whole_corpus_count(corpus, tmp_path):
    config = small_config(corpus, val_last=40, packing="pad")
    meta = prepare(config, tmp_path / "data")
    prepared = load_prepared(tmp_path / "data")
    train_docs, val_docs = training_and_validation_documents(config)
    tokenizer = prepared.tokenizer
    scored = lambda docs: [t for ids in tokenizer.encode_batch(docs) for t in [*ids[:ROW - 2], tokenizer.eos_id]]
    counts = np.bincount(scored(train_docs), minlength=tokenizer.model_vocab_size) + 1.0
    expected = -np.log(counts / counts.sum())[scored(val_docs)].mean()
    assert meta["unigram_val_nll"] == pytest.approx(expected, rel=1e-12)
    assert unigram_nll(prepared.train, prepared.val, tokenizer.model_vocab_size) == meta["unigram_val_nll"]


def test_a_bpe_learns_from_a_training_source_beside_a_validation_source(corpus, tmp_path):
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents(20)))
    config = small_config(corpus, tokenizer="bpe", vocab_size=300, val_source=str(tmp_path / "val.jsonl"))
    assert training_sample(config) == training_and_validation_documents(config)[0]


def test_a_bpe_learns_from_the_first_training_characters_only(corpus, tmp_path):
    config = small_config(corpus, tokenizer="bpe", vocab_size=300, bpe_sample_chars=60_000)
    sample = training_sample(config)
    train_docs, _ = training_and_validation_documents(config)
    assert sample == train_docs[:len(sample)]  # training pieces only, whole, in order
    assert sum(map(len, sample[:-1])) < 60_000 <= sum(map(len, sample))
    prepare(config, tmp_path / "data")
    assert load_prepared(tmp_path / "data").tokenizer.identity() == train_bpe(sample, 300).identity()
    # A corpus smaller than the sample: every training piece, and none of the held-out last ones
    small = small_config(corpus, tokenizer="bpe", val_last=25)
    assert training_sample(small) == training_and_validation_documents(small)[0]


KILLER = """
import os, signal, sys
import pgm.data.corpus, pgm.data.prepare as prepare
pgm.data.corpus.UNIT_CHARS, prepare.SHARD_BYTES = 20_000, 12_000
owner, name, count = {owner}, "{name}", {count}
original, calls = getattr(owner, name), [0]

def dying(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, dying)
from pgm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("owner, name, count", [
    ("prepare.Preparation", "_save", 3),  # between shards: right after a checkpoint
    ("prepare.ShardWriter", "write", 9),  # inside a shard, rows written and not yet recorded
    ("prepare", "truncate_shard", 1),  # after the streams, while the held-out tail leaves the training rows
], ids=["between-shards", "inside-a-shard", "while-finishing"])
def test_a_killed_preparation_resumes_to_the_same_bytes(corpus, tmp_path, owner, name, count):
    config = small_config(corpus, val_last=50)
    overrides = [f"data.{key}={value}" for key, value in config.to_dict().items()
                 if key in ("source", "tokenizer", "gpt2_file", "chunk_chars", "val_last")]
    command = ["prepare", "--out", str(tmp_path / "killed"), "--workers", "2", f"length={ROW}", *overrides]
    killed = subprocess.run([sys.executable, "-c", KILLER.format(owner=owner, name=name, count=count), *command],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "data" / "meta.json").exists()  # not usable until finished
    with pytest.raises(DataError, match="is not finished"):
        _train_on(tmp_path / "killed", tmp_path / "run")
    resumed = subprocess.run([sys.executable, "-m", "pgm", *command], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing the preparation" in resumed.stdout
    prepare(config, tmp_path / "whole", workers=1)
    assert data_files(tmp_path / "killed") == data_files(tmp_path / "whole")


def _train_on(directory, run_dir, preset_config=None, **train_overrides):
    from pgm.train import train

    config = (preset_config or tiny_config(**train_overrides)).with_overrides([f"data.prepared={directory}"])
    return train(config, run_dir, log=lambda *a: None)


def test_another_recipe_is_refused_in_one_sentence(corpus, tmp_path):
    prepare(small_config(corpus), tmp_path / "data")
    with pytest.raises(DataError, match=r"another recipe \(data.chunk_chars: 900 wanted, 1500 prepared\)"):
        prepare(small_config(corpus, chunk_chars=900), tmp_path / "data")
    with pytest.raises(DataError, match="length: 32 wanted, 64 prepared; data.source"):
        _train_on(tmp_path / "data", tmp_path / "run")  # text-tiny: length 32, the built-in corpus
    with pytest.raises(DataError, match="holds no prepared data"):
        _train_on(tmp_path / "nothing", tmp_path / "run")
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        Preparation(small_config(corpus), ROW, tmp_path / "other", workers=0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """text-tiny's data, prepared once with pgm prepare."""
    directory = tmp_path_factory.mktemp("prepared") / "tiny"
    done = subprocess.run([sys.executable, "-m", "pgm", "prepare", "--preset", "text-tiny", "--out", str(directory),
                           "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"data.prepared={directory}" in done.stdout
    return directory


def test_runs_train_on_prepared_data_in_place(tiny_data, text_run, tmp_path):
    from test_train import losses

    import pgm

    before = data_files(tiny_data)
    _train_on(tiny_data, tmp_path / "pgm", log_every=1)
    assert not (tmp_path / "pgm" / "data").exists() and (tmp_path / "pgm" / "tokenizer").is_dir()
    saved = json.loads((tmp_path / "pgm" / "config.json").read_text())
    assert saved["data"]["prepared"] == str(tiny_data.resolve())
    assert losses(tmp_path / "pgm") == losses(text_run)  # the same rows as a run that prepared its own
    from pgm.presets import preset

    _train_on(tiny_data, tmp_path / "mdlm", preset("mdlm-tiny"))  # a second run on the same directory
    assert data_files(tiny_data) == before  # read in place, never written
    pipe = pgm.load(tmp_path / "pgm")
    assert len(pipe.data.val) == load_prepared(tiny_data).meta["val_rows"]
    assert pipe.validation(passes=1, rows=4).tokens > 0


def test_two_nodes_train_like_one_process(tiny_data, text_run, tmp_path):
    """Two torchrun launches on this machine, as on two nodes: c10d rendezvous, one process each,
    the data on a file system both see."""
    from test_train import losses

    port = 29400 + os.getpid() % 500
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                  "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                                  "--rdzv-conf", f"is_host={int(node == 0)}", "-m", "pgm", "train", "--preset",
                                  "text-tiny", "--out", str(tmp_path / "run"), f"data.prepared={tiny_data}",
                                  "log_every=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for node in range(2)]
    outputs = [launch.communicate(timeout=300) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    one, two = losses(text_run), losses(tmp_path / "run")
    assert [s for s, _ in one] == [s for s, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) < 1e-4


def test_a_run_over_several_nodes_prepares_nothing_itself(tmp_path, monkeypatch):
    """A failed preparation would stop only its own node's processes: the others would wait forever."""
    from pgm.errors import RunError
    from pgm.train import train

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunError, match="several nodes needs its data prepared beforehand"):
        train(tiny_config(), tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_compressed_parquet_and_hugging_face_sources_give_the_same_rows(corpus, tmp_path, monkeypatch):
    documents = corpus_documents(120)
    files, hub = tmp_path / "files", tmp_path / "hub"
    files.mkdir(), hub.mkdir()
    with gzip.open(files / "a.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": d}) + "\n" for d in documents[:60])
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pyarrow.table({"text": documents[60:]}), files / "b.parquet", row_group_size=16)
    parquet.write_table(pyarrow.table({"text": documents}), hub / "train.parquet", row_group_size=16)
    assert load_documents(str(files)) == documents  # a folder: its files in sorted order
    reference = prepare(small_config(corpus, source=str(files)), tmp_path / "from-files")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    pytest.importorskip("datasets")
    for streaming in (False, True):
        meta = prepare(small_config(corpus, source=f"hf:{hub}", streaming=streaming), tmp_path / f"hub-{streaming}")
        got, expected = load_prepared(tmp_path / f"hub-{streaming}"), load_prepared(tmp_path / "from-files")
        for split in ("train", "val"):  # the same rows; units, hence shards, end elsewhere
            assert np.array_equal(all_rows(getattr(got, split)), all_rows(getattr(expected, split)))
            counted = ("rows", "documents", "characters", "tokens")
            assert [meta["splits"][split][k] for k in counted] == [reference["splits"][split][k] for k in counted]


def test_a_large_text_file_is_cut_while_it_is_read(tmp_path, monkeypatch):
    import pgm.data.corpus as corpus_module

    text = "\n\n \n".join(corpus_documents(40)) + "\n\n"
    (tmp_path / "book.txt").write_text(text)
    monkeypatch.setattr(corpus_module, "READ_BLOCK", 1000)  # blocks end inside paragraphs and separators
    pieces = [piece for unit in corpus_module.open_source(str(tmp_path / "book.txt"), "train", chunk_chars=2000,
                                                           unit_chars=5000).units for piece in unit.texts]
    assert pieces == chunk_document(text, 2000) and len(pieces) > 10
    one_paragraph = "a line of text\n" * 5000  # no blank line: one piece, read in linear time
    (tmp_path / "lines.txt").write_text(one_paragraph)
    pieces = [piece for unit in corpus_module.open_source(str(tmp_path / "lines.txt"), "train", chunk_chars=2000).units
              for piece in unit.texts]
    assert pieces == chunk_document(one_paragraph, 2000) == [one_paragraph.strip()]
    assert list(group_paragraphs(PARAGRAPH_BREAK.split("a\n\n\n\nb"), 10)) == ["a\n\nb"]


def test_bad_sources_are_one_sentence(corpus, tmp_path):
    def refused(match, **changes):
        with pytest.raises(DataError, match=match):
            prepare(small_config(corpus, **changes), tmp_path / f"out{len(list(tmp_path.iterdir()))}")

    refused("no such data file or folder", source=str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    refused("holds 0 document", source=str(tmp_path / "empty.jsonl"))
    lines = [json.dumps({"text": d}) for d in corpus_documents(80)]
    lines[70] = "{not json"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    refused("bad.jsonl line 71 is not valid JSON", source=str(tmp_path / "bad.jsonl"))  # in a later unit
    (tmp_path / "notgz.jsonl.gz").write_bytes(b"plain bytes, not gzip")
    refused("notgz.jsonl.gz cannot be read", source=str(tmp_path / "notgz.jsonl.gz"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 damaged")
    refused("broken.parquet is not a readable parquet file", source=str(tmp_path / "broken.parquet"))
    (tmp_path / "notes.md").write_text("text")
    refused("notes.md is not a .txt, .jsonl", source=str(tmp_path / "notes.md"))
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pyarrow.table({"content": ["a document"]}), tmp_path / "other.parquet")
    refused("other.parquet has no column 'text'", source=str(tmp_path / "other.parquet"))
    parquet.write_table(pyarrow.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    refused("numbers.parquet: its column 'text' holds int values, not text", source=str(tmp_path / "numbers.parquet"))
    with pytest.raises(DataError, match="the train split yields no rows of length 4000"):
        prepare_text(small_config(corpus, limit_documents=3, val_every=2), 4000, tmp_path / "long",
                     log=lambda *a: None)


def test_a_preparation_continues_only_on_the_source_it_began_with(corpus, tmp_path, monkeypatch):
    import pgm.data.prepare as prepare_module

    source = tmp_path / "corpus.jsonl"
    source.write_text((corpus / "corpus.jsonl").read_text())
    config = small_config(corpus, source=str(source))

    checkpoint = prepare_module.Preparation._checkpoint

    def interrupted(self):
        checkpoint(self)
        raise KeyboardInterrupt  # after the first checkpoint, with units left

    monkeypatch.setattr(prepare_module.Preparation, "_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, tmp_path / "data")
    monkeypatch.undo()
    with open(source, "a") as handle:
        handle.write(json.dumps({"text": "A document added in between."}) + "\n")
    with pytest.raises(DataError, match="the training source changed since this preparation began"):
        prepare(config, tmp_path / "data")


def test_pgm_prepare_refuses_what_it_does_not_read(pgm_main, tmp_path):
    code, _, err = pgm_main("prepare", "--out", str(tmp_path / "d"), "train.lr=0.1")
    assert code == 2 and "pgm prepare reads the data settings and the row length" in err
    code, _, err = pgm_main("prepare", "--out", str(tmp_path / "d"), "--preset", "fmnist-pgm")
    assert code == 2 and "pgm prepare prepares text" in err
    assert not (tmp_path / "d").exists()


def test_a_run_that_prepares_its_own_data_keeps_an_interrupted_preparation(tmp_path, monkeypatch):
    """An interrupt keeps what is done (a rerun continues it); a mistake in the data leaves nothing."""
    import pgm.data.prepare as prepare_module

    original = prepare_module.Preparation._finish

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.Preparation, "_finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(tiny_config().data, 32, tmp_path / "run", log=lambda *a: None)
    assert (tmp_path / "run" / "data" / "progress.json").is_file()
    monkeypatch.setattr(prepare_module.Preparation, "_finish", original)
    said = []
    prepare_data(tiny_config().data, 32, tmp_path / "run", log=said.append)
    assert any("continuing the preparation" in line for line in said)
    prepare_data(tiny_config().data, 32, tmp_path / "whole", log=lambda *a: None)
    assert data_files(tmp_path / "run") == data_files(tmp_path / "whole")
    with pytest.raises(DataError, match="no such data file"):
        prepare_data(tiny_config().data.replace(source=str(tmp_path / "missing")), 32, tmp_path / "new",
                     log=lambda *a: None)


def test_a_distillation_reads_prepared_data_of_its_teachers_tokenizer(tiny_data, text_run, tmp_path):
    from test_distill import losses

    from pgm.distill import distill, distillation_config
    from pgm.errors import RunError
    from pgm.presets import distill_preset

    def distilled(run_dir, *overrides):
        config = distillation_config(text_run, *distill_preset("distill-tiny"), list(overrides))[0]
        distill(config, run_dir, log=lambda *a: None)
        return losses(run_dir)

    in_place = distilled(tmp_path / "in-place", f"data.prepared={tiny_data}")
    assert not (tmp_path / "in-place" / "data").exists()
    assert in_place == distilled(tmp_path / "linked")  # the teacher run's own rows: the same
    other = tmp_path / "other-bpe"
    prepare_text(tiny_config().data.replace(vocab_size=300), 32, other, log=lambda *a: None)
    with pytest.raises(RunError, match="encoded with another tokenizer than the teacher's"):
        distilled(tmp_path / "refused", f"data.prepared={other}")


def dying_at_the_fourth_unit(unit):
    """encode_unit, but its worker dies at the fourth unit, as the kernel's out-of-memory killer would
    kill it (module-level: the task is pickled by name)."""
    if unit.index == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode_unit(unit)


def test_a_worker_that_dies_stops_the_preparation_in_one_sentence_and_it_continues(corpus, tmp_path, monkeypatch):
    import pgm.data.prepare as prepare_module

    config = small_config(corpus, val_last=50)
    monkeypatch.setattr(prepare_module, "encode_unit", dying_at_the_fourth_unit)  # forked workers see it too
    with pytest.raises(prepare_module.PreparationStopped, match="a worker process died while tokenizing"):
        prepare(config, tmp_path / "stopped", workers=2)
    assert (tmp_path / "stopped" / "data" / "progress.json").is_file()
    monkeypatch.undo()
    prepare(config, tmp_path / "stopped", workers=2)
    prepare(config, tmp_path / "whole", workers=1)
    assert data_files(tmp_path / "stopped") == data_files(tmp_path / "whole")
