"""Directories in the layout of kuleshov-group/mdlm-owt (transformers custom code: config.json with
`model_type: "mdlm"`, the DiT under `backbone.` in model.safetensors or pytorch_model.bin), built
here from a tiny MDLM exactly as transformers writes them, and read without transformers."""

import json
from collections import OrderedDict

import pytest
import torch
from conftest import tiny_mdlm
from safetensors.torch import load_file, save_file
from test_data import write_tiktoken_file

import pgm
from pgm.data.tokenizers import GPT2Tokenizer, find_gpt2_file
from pgm.models import MaskedDiffusionConfig, MaskedDiffusionTransformer

TINY_GPT2_MERGES = [b"he", b"ll", b"hell", b"hello", b" t", b"th", b" the"]
TINY_GPT2_VOCAB = 256 + len(TINY_GPT2_MERGES) + 1  # bytes, merges, <|endoftext|>


def mdlm_owt_config(vocab_size, length, hidden, cond, blocks, heads, dropout=0.1, time_conditioning=False):
    """config.json as transformers writes it for kuleshov-group/mdlm-owt (its own keys included)."""
    return {"_name_or_path": "kuleshov-group/mdlm-owt", "architectures": ["MDLM"],
            "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                         "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
            "cond_dim": cond, "dropout": dropout, "hidden_dim": hidden, "model_length": length, "model_type": "mdlm",
            "n_blocks": blocks, "n_heads": heads, "return_dict": False, "time_conditioning": time_conditioning,
            "torch_dtype": "float32", "transformers_version": "4.38.2", "vocab_size": vocab_size}


def authors_tensors(model) -> "OrderedDict[str, torch.Tensor]":
    """The model's tensors under the names transformers gives mdlm-owt's: `backbone.` + the DiT's."""
    return OrderedDict((f"backbone.{name}", tensor.clone()) for name, tensor in model.state_dict().items())


def write_mdlm_owt(directory, model, weights="safetensors", time_conditioning=False, tensors=None, **config_changes):
    """`directory` in mdlm-owt's layout, holding `model`'s tensors (or `tensors`): weights "safetensors"
    (model.safetensors, the Hub's file) or "bin" (pytorch_model.bin, a plain torch.save of the dict)."""
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = mdlm_owt_config(c.vocab_size, c.length, c.hidden_size, c.cond_dim, c.blocks, c.num_heads,
                             time_conditioning=time_conditioning)
    (directory / "config.json").write_text(json.dumps({**config, **config_changes}, indent=2, sort_keys=True))
    tensors = authors_tensors(model) if tensors is None else tensors
    if weights == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    return directory


def by_hand(directory, **shape):
    """Our MDLM module filled from the directory's weight file, its keys renamed here by hand (no
    importer involved), with the shape given explicitly."""
    if (directory / "model.safetensors").is_file():
        tensors = load_file(str(directory / "model.safetensors"))
    else:
        tensors = torch.load(directory / "pytorch_model.bin", weights_only=True)
    model = MaskedDiffusionTransformer(MaskedDiffusionConfig(**shape))
    model.load_state_dict({name.replace("backbone.", "", 1): tensor for name, tensor in tensors.items()})
    return model.eval()


def one_sentence(error) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_an_mdlm_owt_directory_gives_the_logits_of_our_mdlm_on_the_same_tensors(tmp_path, weights):
    # Every field different from the next, so a swapped mapping changes a shape or a value.
    source = tiny_mdlm(vocab_size=47, length=24, hidden_size=48, num_heads=6, blocks=2, cond_dim=20)
    directory = write_mdlm_owt(tmp_path / "mdlm-owt", source, weights)
    model = pgm.from_pretrained(directory)
    assert model.config.to_dict() == dict(
        kind="mdlm", vocab_size=47, length=24, hidden_size=48, num_heads=6, mlp_ratio=4, cond_dim=20, dropout=0.1,
        time_conditioning=False, mask_token_id=46, blocks=2)
    assert not model.training
    expected = by_hand(directory, vocab_size=47, length=24, hidden_size=48, num_heads=6, blocks=2, cond_dim=20)
    tokens = torch.randint(0, 47, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(tokens), expected(tokens)
    assert torch.equal(got, want)
    assert not torch.equal(want, torch.zeros_like(want))  # the redrawn adaLN and output layers are not zero
    assert model.origin.tokenizer_name == "gpt2"
    assert model.origin.source == str(directory / ("model.safetensors" if weights == "safetensors"
                                                   else "pytorch_model.bin"))


def test_time_conditioning_comes_from_the_config(tmp_path):
    source = tiny_mdlm(time_conditioning=True)
    model = pgm.from_pretrained(write_mdlm_owt(tmp_path / "owt", source, time_conditioning=True))
    assert model.config.time_conditioning
    tokens = torch.randint(0, 41, (2, 20), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 2.0])
    with torch.no_grad():
        assert torch.equal(model(tokens, sigma), source(tokens, sigma))
        assert not torch.equal(model(tokens, sigma), model(tokens, torch.zeros(2)))


def test_safetensors_is_read_before_the_pickled_file(tmp_path):
    first, second = tiny_mdlm(), tiny_mdlm()
    with torch.no_grad():
        second.output_layer.linear.bias.add_(1.0)
    directory = write_mdlm_owt(tmp_path / "owt", first)
    write_mdlm_owt(directory, second, "bin")
    loaded = pgm.from_pretrained(directory)
    assert torch.equal(loaded.output_layer.linear.bias, first.output_layer.linear.bias)


def test_the_pickled_file_runs_nothing_it_names(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    tensors = authors_tensors(tiny_mdlm())
    tensors["backbone.payload"] = Payload()
    directory = write_mdlm_owt(tmp_path / "owt", tiny_mdlm(), "bin", tensors=tensors)
    with pytest.raises(ValueError) as refused:
        pgm.from_pretrained(directory)
    assert "1 unexpected tensor(s): backbone.payload" in one_sentence(refused.value)
    assert not marker.exists()


def test_a_pipeline_from_an_mdlm_owt_directory_writes_gpt2_text(tmp_path):
    write_tiktoken_file(tmp_path / "small.tiktoken", TINY_GPT2_MERGES)
    source = tiny_mdlm(vocab_size=TINY_GPT2_VOCAB + 1)  # + the mask, as mdlm-owt's 50258 = GPT-2's 50257 + 1
    directory = write_mdlm_owt(tmp_path / "owt", source)
    pipe = pgm.load(directory, device="cpu", gpt2_file=str(tmp_path / "small.tiktoken"))
    assert isinstance(pipe.tokenizer, GPT2Tokenizer) and pipe.tokenizer.file == tmp_path / "small.tiktoken"
    samples = pipe.sample(prompt="hello the", length=12, steps=4, seed=3)
    assert samples.outputs[0].startswith("hello the")
    assert samples.tokens[0, :3].tolist() == [263, 259, 262]  # BOS, "hello", " the"


@pytest.mark.skipif(find_gpt2_file() is None, reason="no offline copy of gpt2.tiktoken (pip install --no-deps "
                                                      "openai-whisper)")
def test_mdlm_owt_vocabulary_is_gpt2_and_its_mask(tmp_path):
    source = tiny_mdlm(vocab_size=50258, hidden_size=16, num_heads=2, blocks=1, cond_dim=8)
    pipe = pgm.load(write_mdlm_owt(tmp_path / "owt", source), device="cpu", gpt2_file=str(find_gpt2_file()))
    assert pipe.config.vocab_size == 50258 and pipe.config.mask_token_id == 50257
    assert pipe.tokenizer.model_vocab_size == 50258
    assert pipe.generate(prompt="The meaning of life is", length=10, steps=2, seed=0)[0].startswith(
        "The meaning of life is")


def test_convert_writes_a_pretrained_directory_that_loads_to_the_same_model(tmp_path, pgm_main):
    write_tiktoken_file(tmp_path / "small.tiktoken", TINY_GPT2_MERGES)
    source = tiny_mdlm(vocab_size=TINY_GPT2_VOCAB + 1)
    directory = write_mdlm_owt(tmp_path / "mdlm-owt", source, "bin")
    out = tmp_path / "converted"
    code, stdout, stderr = pgm_main("convert", "official", directory, out, "--gpt2-file", tmp_path / "small.tiktoken")
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}: a mdlm model") and stdout.rstrip().endswith("its tokenizer in tokenizer/")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer"]
    assert (out / "tokenizer" / "gpt2.tiktoken").read_bytes() == (tmp_path / "small.tiktoken").read_bytes()
    card = json.loads((out / "config.json").read_text())["card"]
    assert card == {"source": "mdlm-owt (an MDLM in kuleshov-group/mdlm-owt's transformers layout)"}
    converted, original = pgm.load(out, device="cpu"), pgm.load(directory, device="cpu",
                                                                  gpt2_file=str(tmp_path / "small.tiktoken"))
    for a, b in zip(converted.model.state_dict().items(), source.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert converted.generate(num_samples=2, steps=4, seed=5) == original.generate(num_samples=2, steps=4, seed=5)


def assert_refused(pgm_main, directory, tmp_path, *fragments):
    """`pgm convert` and `pgm.load` both refuse `directory` in one sentence holding `fragments`."""
    code, _, err = pgm_main("convert", "official", directory, tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    with pytest.raises(ValueError) as refused:
        pgm.load(directory, device="cpu")
    for fragment in fragments:
        assert fragment in lines[0] and fragment in one_sentence(refused.value), (fragment, lines[0])
    assert not (tmp_path / "out").exists()


def test_another_transformers_model_type_is_refused(tmp_path, pgm_main):
    directory = write_mdlm_owt(tmp_path / "owt", tiny_mdlm(), model_type="udlm")
    assert_refused(pgm_main, directory, tmp_path, "a transformers model of type 'udlm'",
                   "only kuleshov-group/mdlm-owt's type 'mdlm' is read")


def test_missing_tensors_are_named(tmp_path, pgm_main):
    tensors = authors_tensors(tiny_mdlm())
    del tensors["backbone.blocks.1.attn_qkv.weight"], tensors["backbone.sigma_map.mlp.0.bias"]
    directory = write_mdlm_owt(tmp_path / "owt", tiny_mdlm(), tensors=tensors)
    assert_refused(pgm_main, directory, tmp_path,
                   "2 missing tensor(s): backbone.sigma_map.mlp.0.bias, backbone.blocks.1.attn_qkv.weight")


def test_a_tensor_of_another_shape_is_named(tmp_path, pgm_main):
    directory = write_mdlm_owt(tmp_path / "owt", tiny_mdlm(), hidden_dim=64)
    assert_refused(pgm_main, directory, tmp_path, "mis-shaped tensor(s): backbone.vocab_embed.embedding "
                                                  "(file [41, 32], model [41, 64])")


@pytest.mark.parametrize("change,fragment", [
    (dict(n_heads=None), "has no n_heads, which an mdlm config.json holds"),
    (dict(mlp_ratio=2), "has field(s) mlp_ratio that mdlm-owt's config does not"),
    (dict(n_heads=5), "hidden_size 32 is not divisible by num_heads 5"),
], ids=["missing-field", "unknown-field", "impossible"])
def test_a_config_that_is_not_mdlm_owts_is_refused(tmp_path, pgm_main, change, fragment):
    directory = write_mdlm_owt(tmp_path / "owt", tiny_mdlm())
    values = json.loads((directory / "config.json").read_text())
    values.update({k: v for k, v in change.items() if v is not None})
    for key in [k for k, v in change.items() if v is None]:
        del values[key]
    (directory / "config.json").write_text(json.dumps(values))
    assert_refused(pgm_main, directory, tmp_path, fragment)


def test_a_directory_without_weights_is_refused(tmp_path, pgm_main):
    directory = write_mdlm_owt(tmp_path / "owt", tiny_mdlm())
    (directory / "model.safetensors").unlink()
    assert_refused(pgm_main, directory, tmp_path, "has neither model.safetensors nor pytorch_model.bin")


def test_options_that_do_not_apply_are_refused(tmp_path):
    directory = write_mdlm_owt(tmp_path / "owt", tiny_mdlm())
    with pytest.raises(ValueError, match="holds one set of weights .* not ema ones"):
        pgm.from_pretrained(directory, weights="ema")
    with pytest.raises(ValueError, match="length apply to the authors' checkpoint files, not to the directory"):
        pgm.from_pretrained(directory, length=16)
    with pytest.raises(ValueError, match="revision applies to Hub ids only, and .* is a local path: leave it out"):
        pgm.load(directory, revision="main")


def test_a_hub_id_of_mdlm_owt_is_downloaded_at_the_revision_asked_for(tmp_path, monkeypatch):
    import huggingface_hub

    directory = write_mdlm_owt(tmp_path / "snapshot", tiny_mdlm())
    asked = []

    def snapshot_download(repo_id, **options):
        asked.append((repo_id, options))
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = pgm.from_pretrained("kuleshov-group/mdlm-owt", revision="refs/pr/1", token="hf_secret")
    assert asked == [("kuleshov-group/mdlm-owt", {"revision": "refs/pr/1", "token": "hf_secret"})]
    assert torch.equal(model.output_layer.linear.weight, tiny_mdlm().output_layer.linear.weight)
