"""Importing the authors' released text checkpoints, built here in exactly their layout.

The checkpoints are Lightning `torch.save` archives whose `hyper_parameters` pickle OmegaConf
objects and a Hugging Face tokenizer. The stand-in classes below carry the original module and
class names and the same pickled state layout, and exist only while a checkpoint is written:
the importer must read it without any of them being importable.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import types
from collections import OrderedDict

import pytest
import reference_forward
import torch
from conftest import redraw_zero_initialised
from test_data import write_tiktoken_file

from pgm.errors import CheckpointError, MissingDependency
from pgm.hub import from_pretrained, load_pretrained_dir
from pgm.importers import official_parameter_order, read_official_text_checkpoint
from pgm.models import MaskedDiffusionConfig, MaskedDiffusionTransformer, PartitionConfig, PartitionTransformer


class ContainerMetadata:
    pass


class Metadata:
    pass


class AnyNode:
    pass


class DictConfig:
    pass


class ListConfig:
    pass


class GPT2TokenizerFast:
    pass


class Tokenizer:
    pass


STAND_INS = {
    "omegaconf.base": [ContainerMetadata, Metadata],
    "omegaconf.nodes": [AnyNode],
    "omegaconf.dictconfig": [DictConfig],
    "omegaconf.listconfig": [ListConfig],
    "transformers.models.gpt2.tokenization_gpt2_fast": [GPT2TokenizerFast],
    "tokenizers": [Tokenizer],
}


@contextlib.contextmanager
def stand_in_modules():
    """Make the stand-ins importable under the original names, only while pickling (a real
    module already imported, like `tokenizers`, gets its attribute back afterwards)."""
    added, replaced = [], []
    for module_name, classes in STAND_INS.items():
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        module = sys.modules[module_name]
        for cls in classes:
            cls.__module__ = module_name
            replaced.append((module, cls.__name__, getattr(module, cls.__name__, None)))
            setattr(module, cls.__name__, cls)
    try:
        yield
    finally:
        for module, name, original in reversed(replaced):
            if original is None:
                delattr(module, name)
            else:
                setattr(module, name, original)
        for name in added:
            del sys.modules[name]


def omega(value, key=None, parent=None):
    """Build OmegaConf-shaped objects: containers hold `_content`, leaves are AnyNodes with `_val`."""
    if isinstance(value, (dict, list)):
        node = DictConfig() if isinstance(value, dict) else ListConfig()
        metadata = ContainerMetadata()
        metadata.__dict__.update(ref_type=None, object_type=type(value), optional=True, key=key, flags={},
                                 flags_root=False, resolver_cache={}, key_type=None, element_type=None)
        node.__dict__.update(_metadata=metadata, _parent=parent)
        if isinstance(value, dict):
            node._content = {k: omega(v, k, node) for k, v in value.items()}
        else:
            node._content = [omega(v, i, node) for i, v in enumerate(value)]
        return node
    leaf = AnyNode()
    metadata = Metadata()
    metadata.__dict__.update(ref_type=None, object_type=None, optional=True, key=key, flags={}, flags_root=False)
    leaf.__dict__.update(_metadata=metadata, _parent=parent, _val=value)
    return leaf


def tiny_pgm_config(**changes):
    values = dict(vocab_size=262, length=24, hidden_size=32, num_heads=4, encoder_blocks=2, decoder_blocks=2,
                  cond_dim=16, dropout=0.0, pre_query_mode="learn+freqs")
    values.update(changes)
    return PartitionConfig(**values)


def hyper_config(model: dict, tokenizer: str = "gpt2") -> dict:
    return {"model": {"dropout": 0.1, **model}, "algo": {"name": "partition-mdlm", "time_conditioning": False},
            "data": {"tokenizer_name_or_path": tokenizer, "wrap": True}, "noise": {"eps": 1e-3},
            "sampling": {"steps": ["${model.length}", 128]}}


def write_checkpoint(path, model, hyper: dict, *, ema_scale=1.5, edit_state=None, edit_ema=None, extra=None):
    """A Lightning checkpoint of `model` in the released layout; the EMA weights are the raw ones
    times `ema_scale`, listed in the authors' parameter order."""
    state = OrderedDict((f"backbone.{k}", v.clone()) for k, v in model.state_dict().items())
    config = model.config
    order = official_parameter_order(config.kind, getattr(config, "encoder_blocks", getattr(config, "blocks", 0)),
                                     getattr(config, "decoder_blocks", 0), getattr(config, "query_processor", ""),
                                     getattr(config, "query_norm", ""))
    shadow = [state[f"backbone.{name}"] * ema_scale for name in order]
    if edit_state:
        edit_state(state)
    if edit_ema:
        edit_ema(shadow)
    tokenizer = GPT2TokenizerFast()
    inner = Tokenizer()
    inner.__dict__["state"] = b'{"model": {"type": "BPE"}}'
    tokenizer.__dict__.update(_tokenizer=inner, name_or_path="gpt2", model_max_length=1024)
    content = {
        "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.1", "state_dict": state,
        "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": shadow, "collected_params": []},
        "hyper_parameters": {"config": omega(hyper), "tokenizer": tokenizer},
        "optimizer_states": [], "lr_schedulers": [], "loops": {}, "callbacks": {}, **(extra or {}),
    }
    before = {name: sys.modules.get(name) for name in ("omegaconf", "transformers")}
    with stand_in_modules():
        torch.save(content, path)
    assert {name: sys.modules.get(name) for name in before} == before  # stand-ins gone, real modules untouched
    assert getattr(sys.modules.get("tokenizers"), "Tokenizer", None) is not Tokenizer
    return state, shadow


def tiny_pgm(**changes):
    torch.manual_seed(0)
    return redraw_zero_initialised(PartitionTransformer(tiny_pgm_config(**changes)))


@pytest.fixture
def released(tmp_path):
    model = tiny_pgm(pre_query_mode="learn+freqs+mean", query_processor="mlp4")
    path = tmp_path / "pgm_tiny.ckpt"
    hyper = hyper_config({"hidden_size": 32, "n_heads": 4, "length": 24, "cond_dim": 16,
                          "swap": {"pre_query_mode": "learn+freqs+mean", "query_process_mode": "mlp4",
                                   "normalize_mode": "layernorm"}, "encoder": {"n_blocks": 2},
                          "decoder": {"n_blocks": 2}})
    state, shadow = write_checkpoint(path, model, hyper)
    return path, model, state, shadow


def test_weights_land_where_they_should_and_ema_is_the_default(released):
    path, model, state, shadow = released
    imported, hyper = read_official_text_checkpoint(path)
    config = imported.config
    assert (config.hidden_size, config.num_heads, config.encoder_blocks, config.decoder_blocks, config.cond_dim,
            config.mlp_ratio, config.length, config.vocab_size, config.mask_token_id) == (32, 4, 2, 2, 16, 4, 24, 262, 261)
    assert config.query_processor == "mlp4" and config.pre_query_mode == "learn+freqs+mean"
    assert hyper["config"]["data"]["tokenizer_name_or_path"] == "gpt2"
    assert hyper["config"]["sampling"]["steps"] == ["${model.length}", 128]
    assert hyper["tokenizer"] == "<transformers.models.gpt2.tokenization_gpt2_fast.GPT2TokenizerFast>"
    names = official_parameter_order("pgm", 2, 2, "mlp4", "layernorm")
    ours = dict(imported.named_parameters())
    for name, tensor in zip(names, shadow):
        assert torch.equal(ours[name], tensor), name
    raw, _ = read_official_text_checkpoint(path, weights="raw")
    for key, tensor in raw.state_dict().items():
        assert torch.equal(tensor, state[f"backbone.{key}"]), key


def test_our_parameter_order_is_the_authors_order():
    model = tiny_pgm()
    assert [n for n, _ in model.named_parameters()] == official_parameter_order("pgm", 2, 2, "linear", "layernorm")
    mdlm = MaskedDiffusionTransformer(MaskedDiffusionConfig(vocab_size=50, length=8, hidden_size=16, num_heads=2,
                                                            blocks=3, cond_dim=8))
    assert [n for n, _ in mdlm.named_parameters()] == official_parameter_order("mdlm", 3, 0, "", "")


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("backbone.decoder.layers.1.attn_out.weight"),
     "1 missing tensor(s): decoder.layers.1.attn_out.weight"),
    (lambda s: s.__setitem__("backbone.decoder.layers.0.extra.weight", torch.zeros(2)),
     "1 unexpected tensor(s): decoder.layers.0.extra.weight"),
    (lambda s: s.__setitem__("backbone.decoder.layers.0.attn_kv.weight", torch.zeros(60, 32)),
     "decoder.layers.0.attn_kv.weight (file [60, 32], model [64, 32])"),
    (lambda s: s.pop("backbone.vocab_embed.embedding"), "no tensor 'vocab_embed.embedding'"),
])
def test_missing_extra_or_misshaped_tensors_are_refused_by_name(tmp_path, edit, message):
    path = tmp_path / "broken.ckpt"
    write_checkpoint(path, tiny_pgm(), hyper_config({"length": 24}), edit_state=edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_official_text_checkpoint(path, weights="raw")


def test_a_misshaped_ema_tensor_is_refused_by_name(tmp_path):
    path = tmp_path / "ema.ckpt"
    write_checkpoint(path, tiny_pgm(), hyper_config({"length": 24}),
                     edit_ema=lambda shadow: shadow.__setitem__(5, torch.zeros(3)))
    with pytest.raises(CheckpointError, match="EMA tensor for encoder.blocks.0.norm1.weight"):
        read_official_text_checkpoint(path)
    assert read_official_text_checkpoint(path, weights="raw")[0] is not None


@pytest.mark.parametrize("content,message", [
    (b"this is not a checkpoint", "not a PyTorch checkpoint"),
    (None, "no state_dict"),
])
def test_files_that_are_not_checkpoints_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "thing.ckpt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_official_text_checkpoint(path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["PGM_PWNED"],))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    monkeypatch.setenv("PGM_PWNED", str(target))
    path = tmp_path / "evil.ckpt"
    write_checkpoint(path, tiny_pgm(), hyper_config({"length": 24}), extra={"callbacks": {"x": Exploit()}})
    model, _ = read_official_text_checkpoint(path)
    assert not target.exists() and model is not None


@pytest.mark.parametrize("mode,processor", [("learn+freqs", "linear"), ("learn+freqs+mean", "mlp4"),
                                             ("learn+freqs+logsumexp", "linear")])
def test_imported_logits_match_the_reference_forward_in_both_views(tmp_path, mode, processor):
    path = tmp_path / "released.ckpt"
    write_checkpoint(path, tiny_pgm(pre_query_mode=mode, query_processor=processor),
                     hyper_config({"length": 24, "swap": {"pre_query_mode": mode}}))
    model, _ = read_official_text_checkpoint(path)
    assert model.config.pre_query_mode == mode
    state = {k: v.float() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 261, (3, 24), generator=generator)
    groups = torch.rand(3, 24, generator=generator) < 0.5
    positions = torch.arange(24).expand(3, -1)
    worst = []
    with torch.no_grad():
        ours = model(tokens, groups)
        same = groups[:, :, None] == groups[:, None, :]
        theirs = reference_forward.pgm_forward(state, 4, 2, 2, tokens, positions, positions, same, ~same, mode)
        worst.append(float((ours - theirs).abs().max() / theirs.abs().max()))
        order = torch.rand(3, 24, generator=generator).argsort(1)
        clean, queries = order[:, :10], order[:, 10:14]
        ours = model.predict(tokens.gather(1, clean), clean, queries)
        theirs = reference_forward.pgm_forward(state, 4, 2, 2, tokens.gather(1, clean), clean, queries,
                                               torch.ones(3, 10, 10, dtype=torch.bool),
                                               torch.ones(3, 4, 10, dtype=torch.bool), mode)
        worst.append(float((ours - theirs).abs().max() / theirs.abs().max()))
    assert max(worst) <= 1e-5, worst


def test_sigma_map_weights_shape_the_output_without_time_conditioning(released):
    path, _, _, _ = released
    model, _ = read_official_text_checkpoint(path)
    tokens, groups = torch.randint(0, 261, (2, 24)), torch.rand(2, 24) < 0.5
    before = model(tokens, groups)
    with torch.no_grad():
        model.sigma_map.mlp[0].bias.add_(1.0)
    assert not torch.allclose(before, model(tokens, groups))


def test_mdlm_checkpoints_import_too(tmp_path):
    torch.manual_seed(0)
    mdlm = redraw_zero_initialised(MaskedDiffusionTransformer(MaskedDiffusionConfig(
        vocab_size=262, length=24, hidden_size=32, num_heads=4, blocks=3, cond_dim=16, dropout=0.0)))
    path = tmp_path / "mdlm.ckpt"
    _, shadow = write_checkpoint(path, mdlm, hyper_config({"length": 24}))
    model, _ = read_official_text_checkpoint(path)
    assert model.config.kind == "mdlm" and model.config.blocks == 3
    assert torch.equal(model.vocab_embed.embedding, shadow[0])


def test_save_and_load_round_trip_bit_exactly(released, tmp_path):
    path, _, _, _ = released
    model, _ = read_official_text_checkpoint(path)
    model.save_pretrained(tmp_path / "ours")
    again, source = load_pretrained_dir(tmp_path / "ours")
    assert source.name == "model.safetensors" and again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model"]["kind"] == "pgm"
    reloaded = from_pretrained(tmp_path / "ours")
    tokens, groups = torch.randint(0, 261, (2, 24)), torch.rand(2, 24) < 0.5
    assert torch.equal(reloaded(tokens, groups), model(tokens, groups))
    assert torch.equal(from_pretrained(path)(tokens, groups), model(tokens, groups))


def test_hub_ids_without_huggingface_hub_give_one_sentence(without_package):
    without_package("huggingface_hub")
    with pytest.raises(MissingDependency, match="needs huggingface_hub"):
        from_pretrained("jdeschena/pgm/pgm_8_8.ckpt")


def test_convert_and_sample_from_the_command_line(released, tmp_path):
    path, _, _, _ = released
    write_tiktoken_file(tmp_path / "tiny.tiktoken", [b"he", b"ll", b"hell", b"hello"])
    out = tmp_path / "converted"
    command = [sys.executable, "-m", "pgm"]
    done = subprocess.run(command + ["convert", "official", str(path), str(out), "--weights", "raw",
                                     "--gpt2-file", str(tmp_path / "tiny.tiktoken")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "tokenizer" / "gpt2.tiktoken").is_file()
    raw, _ = read_official_text_checkpoint(path, weights="raw")
    converted, _ = load_pretrained_dir(out)
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), converted.state_dict().values()))
    sampled = subprocess.run(command + ["sample", str(out), "--num-samples", "2", "--steps", "4"],
                             capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.count("=== sample") == 2
    refused = subprocess.run(command + ["convert", "official", str(tmp_path / "tiny.tiktoken"), str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "not a PyTorch checkpoint" in refused.stderr
