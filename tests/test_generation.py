"""Prompts and infilling templates: parsed, placed at the right positions, decoded back, and
refused in one sentence when malformed."""

import pytest
import torch

from pgm.data.tokenizers import train_bpe
from pgm.generation import decode_samples, known_from_text, parse_template, template_tokens

TEXT = "It was a dark and stormy night; the rain fell in torrents, except at occasional intervals. " * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=300)


def test_a_template_is_text_and_gaps_in_order():
    assert parse_template("It was {{10}} night.") == ["It was ", 10, " night."]
    assert parse_template("{{3}}x{{ 2 }}") == [3, "x", 2]
    assert parse_template("{{1}}") == [1]


@pytest.mark.parametrize("template,message", [
    ("It was {{x}} night.", "not a positive number of tokens"),
    ("It was {{4} night.", "unmatched '{{'"),
    ("It was {{-2}} night.", "not a positive number of tokens"),
    ("It was {{0}} night.", "not a positive number of tokens"),
    ("It was }} night {{3}}.", "unmatched '}}'"),
    ("It was a dark night.", "has no gap"),
    ("", "has no gap"),
])
def test_malformed_templates_are_refused_in_one_sentence(template, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_template(template)
    assert "\n" not in str(error.value)


def test_template_tokens_are_placed_after_the_bos_with_the_gaps_unknown(tokenizer):
    ids, known = template_tokens(tokenizer, "It was {{3}} night.")
    before, after = tokenizer.encode_batch(["It was "])[0], tokenizer.encode_batch([" night."])[0]
    assert ids == before + [0, 0, 0] + after
    assert known == [True] * len(before) + [False] * 3 + [True] * len(after)
    tokens, mask = known_from_text(tokenizer, length=None, max_length=64, templates=["It was {{3}} night."],
                                   copies=2)
    assert tokens.shape == (2, 1 + len(ids)) and tokens[0, 0] == tokenizer.bos_id and mask[:, 0].all()
    assert tokens[1, 1:].tolist() == ids and mask[1, 1:].tolist() == known


def test_filled_templates_decode_back_with_the_generated_spans_marked(tokenizer):
    tokens, mask = known_from_text(tokenizer, length=None, max_length=64, templates=["It was {{2}} night."])
    gap = tokenizer.encode_batch([" a dark and"])[0][:2]
    filled = tokens.clone()
    filled[~mask] = torch.tensor(gap)
    plain = decode_samples(filled, tokenizer, mask)[0]
    marked = decode_samples(filled, tokenizer, mask, mark_generated=True)[0]
    assert plain == "It was " + tokenizer.decode(gap) + " night."
    assert marked == "It was [[" + tokenizer.decode(gap) + "]] night."


def test_prompts_of_different_lengths_make_a_ragged_batch(tokenizer):
    tokens, mask = known_from_text(tokenizer, length=20, max_length=64, prompts=["It", "It was a dark"], copies=2)
    lengths = mask.sum(1).tolist()
    first, second = (1 + len(tokenizer.encode_batch([p])[0]) for p in ("It", "It was a dark"))
    assert lengths == [first, first, second, second]
    assert decode_samples(tokens[:, :second], tokenizer, mask[:, :second])[2] == "It was a dark"


@pytest.mark.parametrize("kwargs,message", [
    (dict(length=0), r"length must lie in \[2, 64\]"),
    (dict(length=100), r"length must lie in \[2, 64\]"),
    (dict(length=3, prompts=["It was a dark and stormy night"]), "prompt takes"),
    (dict(length=None, prompts=["It"], templates=["{{2}}"]), "not both"),
])
def test_lengths_that_cannot_hold_the_request_are_refused(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        known_from_text(tokenizer, max_length=64, **kwargs)


def test_a_prompt_that_fills_the_length_leaves_nothing_to_generate(tokenizer):
    needed = 1 + len(tokenizer.encode_batch(["It was"])[0])
    with pytest.raises(ValueError, match="leaving nothing to generate"):
        known_from_text(tokenizer, length=needed, max_length=64, prompts=["It was"])
