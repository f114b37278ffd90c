import base64
import json

import numpy as np
import pytest
import torch

from pgm.data import DataConfig, TokenRows, load_prepared, prepare_data, training_and_validation_documents
from pgm.data.corpus import (builtin_corpus_path, builtin_documents, chunk_document, gutenberg_books, load_documents,
                             split_documents)
from pgm.data.packing import RowPacker, ShardWriter, dtype_for, with_eos
from pgm.data.tokenizers import GPT2Tokenizer, find_gpt2_file, load_tokenizer, train_bpe
from pgm.errors import DataError

FAKE_DUMP = """The Project Gutenberg EBook of A Tale, by Someone

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK A TALE ***

Produced by Volunteers

CHAPTER I

It was a dark
and stormy night.

The end came soon.

End of the Project Gutenberg EBook of A Tale

*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***

Section 1. General Terms of Use and Redistributing Project Gutenberg-tm

*** START OF THE PROJECT GUTENBERG EBOOK, SECOND ***
Second book body.
*** END OF THE PROJECT GUTENBERG EBOOK, SECOND ***
 the
 be
def g():
  pass
"""


def test_gutenberg_bodies_are_kept_and_boilerplate_dropped():
    books = gutenberg_books(FAKE_DUMP)
    assert len(books) == 2
    assert "dark\nand stormy" in books[0] and "General Terms" not in books[0]
    assert books[1].strip() == "Second book body."


def test_builtin_corpus_is_four_clean_books():
    documents = builtin_documents()
    assert len(documents) == 4
    text = "\n".join(documents)
    assert "Sherlock Holmes" in documents[0] or "SHERLOCK HOLMES" in documents[0]
    assert "Project Gutenberg" not in text and "Retrieved from" not in text and "def g():" not in text
    assert 5_500_000 < len(text) < 6_500_000
    assert builtin_corpus_path().name == "big.txt"


def test_split_is_deterministic_and_disjoint():
    documents = builtin_documents()
    train, val = split_documents(documents, chunk_chars=4000, val_every=20, val_last=0)
    again = split_documents(documents, chunk_chars=4000, val_every=20, val_last=0)
    assert (train, val) == again
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.06
    assert not set(train) & set(val)
    assert max(map(len, train)) < 4000 * 2


def test_the_split_holds_out_every_kth_or_the_last_pieces_by_hand():
    docs = [f"d{i}" for i in range(10)]
    split = lambda **kw: split_documents(docs, chunk_chars=0, **{"val_every": 3, "val_last": 0, **kw})
    assert split() == (["d0", "d1", "d3", "d4", "d6", "d7", "d9"], ["d2", "d5", "d8"])
    assert split(val_last=2) == (docs[:8], ["d8", "d9"])
    assert split(limit=5) == (["d0", "d1", "d3", "d4"], ["d2"])
    assert split(limit=2) == (["d0"], ["d1"])  # too few for one of every 3: the last piece is held out
    with pytest.raises(DataError, match="holds 1 document"):
        split(limit=1)


def test_chunking_cuts_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(10))
    pieces = chunk_document(text, 130)
    assert all(len(p) <= 130 for p in pieces) and "\n\n".join(pieces) == text


def test_user_text_files_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n\n" + json.dumps({"body": "third"}))
    assert load_documents(str(tmp_path), text_field="body") == ["first document", "second", "third"]
    with pytest.raises(DataError, match="no string field 'text'"):
        load_documents(str(tmp_path / "sub" / "b.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="no such data file"):
        load_documents(str(tmp_path / "missing.txt"))


def pieces(*documents, eos):
    """(the stream of the pieces, each followed by EOS; their lengths)."""
    stream = with_eos([np.array(d, dtype=np.int64) for d in documents], eos, np.dtype(np.uint8))
    return stream, np.array([len(d) for d in documents])


def test_wrap_packing_makes_bos_body_eos_rows():
    assert pieces([1, 2], [3], eos=7)[0].tolist() == [1, 2, 7, 3, 7]
    packer = RowPacker("wrap", length=5, bos=0, eos=99, pad=98, dtype=np.dtype(np.uint8))
    # stream: 1 2 3 99 4 5 99 6 7 8 9 99 -> bodies of 3, in two calls: the carry continues the stream
    first, _ = packer.pack(*pieces([1, 2, 3], [4, 5], eos=99))
    assert first.tolist() == [[0, 1, 2, 3, 99], [0, 99, 4, 5, 99]] and packer.carry.tolist() == [99]
    assert packer.starts(np.array([4])).tolist() == [7]  # the third piece starts at stream offset 7
    second, _ = packer.pack(*pieces([6, 7, 8, 9], eos=99))
    assert second.tolist() == [[0, 99, 6, 7, 99], [0, 8, 9, 99, 99]] and packer.carry.tolist() == []


def test_pad_packing_keeps_one_document_per_row(tmp_path):
    packer = RowPacker("pad", length=5, bos=0, eos=9, pad=8, dtype=np.dtype(np.uint8))
    rows, valid = packer.pack(*pieces([1, 2], [3, 4, 5, 6, 7], [], eos=9))
    assert rows.tolist() == [[0, 1, 2, 9, 8], [0, 3, 4, 5, 9], [0, 9, 8, 8, 8]] and valid.tolist() == [4, 5, 2]
    assert packer.starts(np.array([1, 1])).tolist() == [3, 4]  # row numbers
    writer = ShardWriter(tmp_path, "x", 0, 5, dtype_for(10), padded=True)
    writer.write(rows[:2], valid[:2])
    writer.write(rows[2:], valid[2:])
    assert writer.close() == {"name": "x-00000.bin", "rows": 3}
    tokens, mask = TokenRows(tmp_path / "x-00000.bin")[[0, 1, 2]]
    assert tokens.tolist() == rows.tolist()
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5, [True] * 2 + [False] * 3]


def test_rows_of_several_shards_read_as_one_array(tmp_path):
    shards = []
    for number, block in enumerate((np.arange(12).reshape(3, 4), np.arange(100, 108).reshape(2, 4))):
        writer = ShardWriter(tmp_path, "s", number, 4, dtype_for(200), padded=False)
        writer.write(block)
        shards.append(tmp_path / writer.close()["name"])
    rows = TokenRows(shards)
    assert len(rows) == 5
    tokens, valid = rows[[4, 0, 3, 2]]
    assert valid is None and tokens[:, 0].tolist() == [104, 0, 100, 8]
    with pytest.raises(IndexError):
        rows[[5]]


def test_truncated_rows_are_detected(tmp_path):
    writer = ShardWriter(tmp_path, "r", 0, 4, dtype_for(10), padded=False)
    writer.write(np.array([[0, 1, 2, 3]] * 3))
    path = tmp_path / writer.close()["name"]
    with open(path, "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TokenRows(path)


def test_bpe_trains_saves_and_round_trips(tmp_path):
    documents = ["the cat sat on the mat. " * 20, "a dog ran after the cat! " * 20]
    tokenizer = train_bpe(documents, vocab_size=300)
    assert 260 < tokenizer.vocab_size <= 300  # fewer when the text runs out of merges
    assert tokenizer.mask_id == tokenizer.vocab_size and tokenizer.model_vocab_size == tokenizer.vocab_size + 1
    ids = tokenizer.encode_batch(["the cat ran é"])[0]
    assert tokenizer.decode(ids) == "the cat ran é"
    tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode_batch(["the cat ran é"])[0] == ids and again.bos_id == 0 and again.pad_id == 1


def write_tiktoken_file(path, merges):
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)))


def test_gpt2_tokenizer_reads_a_local_tiktoken_file(tmp_path):
    write_tiktoken_file(tmp_path / "small.tiktoken", [b"he", b"ll", b"hell", b"hello"])
    tokenizer = GPT2Tokenizer(tmp_path / "small.tiktoken")
    assert tokenizer.vocab_size == 261 and tokenizer.eos_id == 260 and tokenizer.mask_id == 261
    assert tokenizer.encode_batch(["hello"]) == [[259]]
    assert tokenizer.decode([259, 260, 32, 104]) == "hello h"
    tokenizer.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode_batch(["hello"]) == [[259]]
    with pytest.raises(DataError, match="no GPT-2 BPE file"):
        GPT2Tokenizer(tmp_path / "missing.tiktoken")


def test_gpt2_arrays_are_its_ordinary_encoding(tmp_path):
    write_tiktoken_file(tmp_path / "small.tiktoken", [b"he", b"ll", b"hell", b"hello"])
    tokenizer = GPT2Tokenizer(tmp_path / "small.tiktoken")
    texts = ["hello there", "a lone \ud800 surrogate", "text <|endoftext|> as text", ""]
    assert [a.tolist() for a in tokenizer.encode_each(texts)] == tokenizer.encode_batch(texts)


@pytest.mark.skipif(find_gpt2_file() is None, reason="no offline copy of gpt2.tiktoken (pip install --no-deps openai-whisper)")
def test_real_gpt2_bpe_matches_known_ids():
    tokenizer = GPT2Tokenizer()
    assert tokenizer.encode_batch(["Hello world"]) == [[15496, 995]]
    assert tokenizer.model_vocab_size == 50258 and tokenizer.mask_id == 50257 and tokenizer.bos_id == 50256


def test_prepare_data_writes_rows_tokenizer_and_unigram_baseline(tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": f"document number {i}. " * 30}) + "\n" for i in range(40)))
    config = DataConfig(source=str(source), vocab_size=300, val_every=10)
    prepared = prepare_data(config, 16, tmp_path / "run", log=lambda *a: None)
    assert prepared.meta["val_rows"] > 0 and prepared.meta["train_rows"] > prepared.meta["val_rows"]
    tokens, valid = prepared.train[np.arange(3)]
    assert valid is None and tokens.shape == (3, 16)
    assert (tokens[:, 0] == 0).all() and (tokens[:, -1] == 0).all()  # BOS ... EOS
    assert 0 < prepared.meta["unigram_val_nll"] < np.log(301)
    reloaded = load_prepared(tmp_path / "run")
    assert torch.equal(reloaded.val[[0]][0], prepared.val[[0]][0])


def test_a_validation_source_gives_the_validation_documents(tmp_path):
    (tmp_path / "train.txt").write_text("The training text.")
    (tmp_path / "val.txt").write_text("The validation text.")
    config = DataConfig(source=str(tmp_path / "train.txt"), val_source=str(tmp_path / "val.txt"))
    assert training_and_validation_documents(config) == (["The training text."], ["The validation text."])
    (tmp_path / "val.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        training_and_validation_documents(config)
