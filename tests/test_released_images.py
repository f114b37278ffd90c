"""The authors' ImageNet releases, made here in their exact layouts at small shapes: the image PGM
and the Halton-MaskGIT baseline (`torch.save({"iter", "global_epoch", "model_state_dict", ...})`)
and LlamaGen's VQ ({"model": state_dict, "args": ...}). They are imported without running anything
in them, checked tensor by tensor, held against an independent transcription of the reference
forward (image-stack §3.3-3.5), sampled from the command line, and their two reference-sampler
behaviours (the hidden newest token, MaskGIT's redraw) change exactly what they should."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import reference_forward
import torch
from conftest import redraw_zero_initialised
from test_official import Exploit, hyper_config, tiny_pgm, write_checkpoint

import pgm
from pgm.errors import CheckpointError
from pgm.importers import read_official_image_checkpoint, read_official_text_checkpoint, read_released_checkpoint
from pgm.models import MaskGITConfig, MaskGITTransformer, PartitionConfig, PartitionTransformer, VQConfig, VQModel
from pgm.presets import IMAGE_SHAPES
from pgm.sampling import generate_codes
from pgm.sampling.settings import SamplerSettings

CODES, CLASSES, GRID = 32, 5, 32  # a tiny codebook, 5 classes, the released 32 x 32 grid
CELLS = GRID * GRID


def tiny_image_pgm(**changes) -> PartitionTransformer:
    values = dict(vocab_size=CODES + 2, length=1 + CELLS, mask_token_id=CODES, hidden_size=32, num_heads=4,
                  encoder_blocks=2, decoder_blocks=2, cond_dim=32, dropout=0.0, num_classes=CLASSES, registers=2)
    values.update(changes)
    torch.manual_seed(0)
    return redraw_zero_initialised(PartitionTransformer(PartitionConfig(**values))).eval()


def tiny_maskgit(**changes) -> MaskGITTransformer:
    values = dict(codebook_size=CODES, grid_size=GRID, hidden_size=64, depth=2, num_heads=16, mlp_dim=256,
                  num_classes=CLASSES, registers=1, dropout=0.0)  # the released 16 heads: the weights do not show them
    values.update(changes)
    torch.manual_seed(0)
    model = MaskGITTransformer(MaskGITConfig(**values))
    with torch.no_grad():  # the block modulations start at zero: give them weights
        for layer in model.transformer.layers:
            layer.mlp[1].weight.normal_(std=0.3)
    return model.eval()


def tiny_vq() -> VQModel:
    """A VQ whose shapes VQ-8's defaults read right (256 px, 32 groups): four levels make the 32 x 32 grid."""
    torch.manual_seed(0)
    return VQModel(VQConfig(in_channels=3, image_size=256, channels=32, channel_multipliers=[1] * 4,
                            encoder_res_blocks=1, decoder_res_blocks=1, z_channels=8, codebook_size=CODES,
                            codebook_dim=4, norm_groups=32)).eval()


def write_image_checkpoint(path, model, prefix="", extra=None):
    """The authors' image checkpoint: save_network's dict, the state_dict without prefixes (a
    DDP or compiled model would add one, which readers strip)."""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"iter": 5000, "global_epoch": 1, "model_state_dict": state, "optimizer_state_dict": None,
                **(extra or {})}, path)


def released_image_pgm_keys(encoder_blocks: int, decoder_blocks: int, hidden=1024, vocab=16386, classes=1001,
                            heads=16) -> list[tuple[str, tuple]]:
    """The state_dict of the released image PGM as image-stack §3.2 lists it."""
    block = lambda p: [(f"{p}.norm1.weight", (hidden,)), (f"{p}.attn_qkv.weight", (3 * hidden, hidden)),  # noqa: E731
                       (f"{p}.attn_out.weight", (hidden, hidden)), (f"{p}.norm2.weight", (hidden,)),
                       (f"{p}.mlp.0.weight", (4 * hidden, hidden)), (f"{p}.mlp.0.bias", (4 * hidden,)),
                       (f"{p}.mlp.2.weight", (hidden, 4 * hidden)), (f"{p}.mlp.2.bias", (hidden,)),
                       (f"{p}.adaLN_modulation.weight", (6 * hidden, hidden)),
                       (f"{p}.adaLN_modulation.bias", (6 * hidden,))]
    cross = lambda p: [(f"{p}.q_norm1.weight", (hidden,)), (f"{p}.kv_norm1.weight", (hidden,)),  # noqa: E731
                       (f"{p}.norm2.weight", (hidden,)), (f"{p}.attn_q.weight", (hidden, hidden)),
                       (f"{p}.attn_kv.weight", (2 * hidden, hidden)), (f"{p}.attn_out.weight", (hidden, hidden)),
                       (f"{p}.mlp.0.weight", (4 * hidden, hidden)), (f"{p}.mlp.0.bias", (4 * hidden,)),
                       (f"{p}.mlp.2.weight", (hidden, 4 * hidden)), (f"{p}.mlp.2.bias", (hidden,)),
                       (f"{p}.adaLN_modulation.weight", (6 * hidden, hidden)),
                       (f"{p}.adaLN_modulation.bias", (6 * hidden,))]
    swap = "decoder.group_swap"
    return sorted([("vocab_embed.embedding", (vocab, hidden)), ("cls_embed.embedding_table.weight", (classes, hidden)),
                   ("rotary_emb.inv_freq", (hidden // heads // 2,))]
                  + [k for i in range(encoder_blocks) for k in block(f"encoder.blocks.{i}")]
                  + [(f"{swap}.base_embedding", (1, hidden)), (f"{swap}.pre_query_norm.weight", (hidden,)),
                     (f"{swap}.pre_query_norm.bias", (hidden,)), (f"{swap}.query_processor.weight", (hidden, hidden)),
                     (f"{swap}.query_processor.bias", (hidden,)), (f"{swap}.hidden_to_key_value.weight",
                                                                  (2 * hidden, hidden)),
                     (f"{swap}.hidden_to_key_value.bias", (2 * hidden,)), (f"{swap}.output_linear.weight",
                                                                           (hidden, hidden)),
                     (f"{swap}.output_linear.bias", (hidden,))]
                  + [k for j in range(decoder_blocks) for k in cross(f"decoder.layers.{j}")]
                  + [("output_layer.norm_final.weight", (hidden,)), ("output_layer.linear.weight", (vocab, hidden)),
                     ("output_layer.linear.bias", (vocab,)), ("output_layer.adaLN_modulation.weight",
                                                             (2 * hidden, hidden)),
                     ("output_layer.adaLN_modulation.bias", (2 * hidden,)), ("reg_tokens.weight", (2, hidden))])


@pytest.mark.parametrize("shape,blocks,entries", [("imagenet-12-12", (12, 12), 282), ("imagenet-14-10", (14, 10), 278)])
def test_the_released_image_pgm_shapes_have_the_released_state_dict(shape, blocks, entries):
    with torch.device("meta"):
        model = PartitionTransformer(IMAGE_SHAPES[shape]())
    ours = sorted((name, tuple(t.shape)) for name, t in model.state_dict().items())
    assert ours == released_image_pgm_keys(*blocks) and len(ours) == entries
    assert round(model.num_parameters() / 1e6, 1) == 494.2


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod."])
def test_an_image_pgm_file_lands_tensor_by_tensor(tmp_path, prefix):
    source = tiny_image_pgm()
    write_image_checkpoint(tmp_path / "images_pgm.ckpt", source, prefix)
    model, kind = read_official_image_checkpoint(tmp_path / "images_pgm.ckpt")
    config = model.config
    assert kind == "pgm" and not model.training
    assert (config.vocab_size, config.mask_token_id, config.num_classes, config.registers) == (34, 32, 5, 2)
    assert (config.num_heads, config.encoder_blocks, config.decoder_blocks, config.length) == (4, 2, 2, 1025)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.decoder.group_swap.pos_freqs, source.decoder.group_swap.pos_freqs)  # recomputed
    # Without rotary_emb.inv_freq the heads cannot be read: the released models' 16, or --num-heads.
    state = {k: v for k, v in source.state_dict().items() if k != "rotary_emb.inv_freq"}
    torch.save({"model_state_dict": state}, tmp_path / "old.ckpt")
    assert read_official_image_checkpoint(tmp_path / "old.ckpt", num_heads=4, length=17)[0].config.length == 17
    assert read_official_image_checkpoint(tmp_path / "old.ckpt")[0].config.num_heads == 16


def released_views(model, state, tokens, groups, labels):
    """(ours, the transcription's) logits in the training view and in the inference view."""
    registers = state["reg_tokens.weight"]
    batch, length = tokens.shape
    positions = torch.arange(length + 2).expand(batch, -1)
    # Training view: [reg row 0 (group 1), reg row 1 (group 0), BOS, codes], positions = sequence indices.
    full = torch.cat([torch.tensor([True, False]).expand(batch, -1), groups], 1)
    same = full[:, :, None] == full[:, None, :]
    theirs_train = reference_forward.pgm_forward(state, 4, 2, 2, tokens, positions, positions[:, 2:], same,
                                                 ~same[:, 2:], labels=labels, registers=registers)
    ours_train = model(tokens, groups, labels)
    # Inference view: only reg row 1 (position 1), then the clean tokens at their positions + 2.
    clean = (~groups[0]).nonzero()[:, 0].expand(batch, -1)
    queries = groups[0].nonzero()[:, 0][:5].expand(batch, -1)
    ones = torch.ones(batch, 1, dtype=torch.long)
    theirs_infer = reference_forward.pgm_forward(
        state, 4, 2, 2, tokens.gather(1, clean), torch.cat([ones, clean + 2], 1), queries + 2,
        torch.ones(batch, clean.shape[1] + 1, clean.shape[1] + 1, dtype=torch.bool),
        torch.ones(batch, 5, clean.shape[1] + 1, dtype=torch.bool), labels=labels, registers=registers[1:])
    ours_infer = model.predict(tokens.gather(1, clean), clean, queries, cond=labels)
    return (ours_train, theirs_train.gather(1, torch.arange(length).expand(batch, -1)[..., None].expand(
        -1, -1, theirs_train.shape[-1]))), (ours_infer, theirs_infer)


def test_the_imported_image_pgm_is_the_reference_forward_in_both_views(tmp_path):
    write_image_checkpoint(tmp_path / "pgm.ckpt", tiny_image_pgm())
    model, _ = read_official_image_checkpoint(tmp_path / "pgm.ckpt")
    state = {k: v.float() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CODES, (3, 1 + CELLS), generator=generator)
    tokens[:, 0] = CODES + 1  # the BOS
    groups = torch.rand(3, 1 + CELLS, generator=generator) < 0.5
    groups[:, 0] = False  # the BOS is always in group 0
    groups[1:] = groups[0]  # (the inference view below uses row 0's clean set for every row)
    labels = torch.tensor([0, 3, CLASSES])  # the null class too
    with torch.no_grad():
        views = released_views(model, state, tokens, groups, labels)
    worst = [float((ours - theirs).abs().max() / theirs.abs().max()) for ours, theirs in views]
    assert max(worst) <= 1e-5, worst


class PredictSpy:
    """An image PGM whose `predict` calls are recorded (number of clean slots given, lengths)."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def parameters(self):
        return self.model.parameters()

    def condition(self, *args):
        return self.model.condition(*args)

    def predict(self, clean_tokens, clean_positions, queries, lengths, cond, **kwargs):
        self.calls.append((clean_tokens.shape[1], None if lengths is None else lengths.tolist()))
        return self.model.predict(clean_tokens, clean_positions, queries, lengths, cond, **kwargs)


def test_hide_newest_hides_exactly_the_newest_clean_token():
    model = tiny_image_pgm()
    labels = torch.tensor([1, 2])
    spy = PredictSpy(model)
    plain = generate_codes(spy, labels, settings=SamplerSettings(steps=4), generator=torch.Generator().manual_seed(0))
    assert all(lengths is None for _, lengths in spy.calls)
    spy.calls.clear()
    hidden = generate_codes(spy, labels, settings=SamplerSettings(steps=4, hide_newest=True),
                            generator=torch.Generator().manual_seed(0))
    assert [lengths for _, lengths in spy.calls] == [[width - 1] * 2 for width, _ in spy.calls]
    assert spy.calls[0][0] == 1  # at the first step only the BOS is clean, and it is hidden: the register alone
    assert not torch.equal(plain, hidden)
    # The training view with the newest token moved out of the clean set gives the same tokens,
    reference = generate_codes(model, labels, settings=SamplerSettings(steps=4, hide_newest=True),
                               generator=torch.Generator().manual_seed(0), view="reference")
    assert torch.equal(hidden, reference)
    # and one call against the transcription with the last clean key masked.
    state = {k: v.float() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, CODES, (2, 6), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[0, 9, 4, 30, 11, 2]] * 2)
    queries = torch.tensor([[5, 6, 7]] * 2)
    allowed = torch.arange(7) < 6  # [register, 6 clean]: the newest (last) hidden
    with torch.no_grad():
        ours = model.predict(tokens, positions, queries, torch.tensor([5, 5]), labels)
        theirs = reference_forward.pgm_forward(state, 4, 2, 2, tokens, torch.cat([torch.ones(2, 1, dtype=torch.long),
                                                                                  positions + 2], 1), queries + 2,
                                               allowed.expand(2, 7, 7), allowed.expand(2, 3, 7), labels=labels,
                                               registers=state["reg_tokens.weight"][1:])
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-5


class StepCounter(torch.nn.Module):
    """A masked model whose logits at every cell pick the code (number of known cells) % CODES."""

    def __init__(self):
        super().__init__()
        self.config = MaskGITConfig(codebook_size=CODES, grid_size=GRID, hidden_size=8, depth=1, num_heads=2,
                                    mlp_dim=8, num_classes=CLASSES)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def condition(self, labels, batch):
        return labels.reshape(-1).expand(batch)

    def forward(self, codes, labels, check_inputs=True):
        known = (codes != CODES).sum(1)
        logits = torch.full((*codes.shape, CODES + 1), -30.0)
        logits[torch.arange(codes.shape[0])[:, None], torch.arange(codes.shape[1]), (known % CODES)[:, None]] = 30.0
        return logits


def test_redraw_draws_every_decoded_cell_again_at_each_step():
    from pgm.sampling.codes import halton_order
    from pgm.sampling.common import arccos_bounds

    model, labels = StepCounter(), torch.tensor([0, 1])
    kept = generate_codes(model, labels, settings=SamplerSettings(steps=4, temperature=0))
    redrawn = generate_codes(model, labels, settings=SamplerSettings(steps=4, temperature=0, redraw=True))
    # Step i sees bounds[i] decoded cells and draws the code bounds[i] % CODES: upstream keeps each
    # cell's first draw; the paper's baseline draws them all again, so every cell holds the last step's.
    bounds = arccos_bounds(torch.tensor(CELLS), 4).tolist()
    expected = torch.empty(CELLS, dtype=torch.long)
    for step in range(4):
        expected[halton_order(GRID)[bounds[step]:bounds[step + 1]]] = bounds[step] % CODES
    assert torch.equal(kept, expected.expand(2, -1))
    assert torch.equal(redrawn, torch.full((2, CELLS), bounds[3] % CODES))
    with pytest.raises(ValueError, match="redraw reproduces the authors' MaskGIT sampler; this is a pgm model"):
        generate_codes(tiny_image_pgm(), labels, settings=SamplerSettings(steps=4, redraw=True))
    with pytest.raises(ValueError, match="redraw applies to a masked model"):  # the loop's own check of its view
        generate_codes(model, labels, settings=SamplerSettings(steps=4, redraw=True), view="efficient")


def test_a_maskgit_file_imports_with_its_tied_head(tmp_path):
    source = tiny_maskgit()
    write_image_checkpoint(tmp_path / "maskgit.ckpt", source)
    assert "head.weight" in torch.load(tmp_path / "maskgit.ckpt")["model_state_dict"]  # both names, as released
    model, kind = read_official_image_checkpoint(tmp_path / "maskgit.ckpt")
    assert kind == "maskgit" and model.head.weight is model.tok_emb.weight
    assert model.config.replace(dropout=0.0) == source.config and model.config.dropout == 0.1  # as released
    codes = torch.randint(0, CODES + 1, (2, CELLS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(codes, torch.tensor([1, CLASSES])), source(codes, torch.tensor([1, CLASSES])))
    odd = tiny_maskgit(mlp_dim=100, registers=0)  # a SwiGLU width that is not 2/3 of 4 x hidden
    write_image_checkpoint(tmp_path / "odd.ckpt", odd)
    again, _ = read_official_image_checkpoint(tmp_path / "odd.ckpt")
    assert again.config.ffn_hidden == odd.config.ffn_hidden and again.config.registers == 0


def test_released_files_are_told_apart_by_their_content_and_refused_by_the_wrong_reader(tmp_path):
    write_image_checkpoint(tmp_path / "pgm.ckpt", tiny_image_pgm())
    write_image_checkpoint(tmp_path / "maskgit.ckpt", tiny_maskgit())
    torch.save({"model": tiny_vq().state_dict(), "args": argparse.Namespace(vq_model="VQ-8")}, tmp_path / "vq.pt")
    write_checkpoint(tmp_path / "text.ckpt", tiny_pgm(), hyper_config({"length": 24}))
    kinds = {name: read_released_checkpoint(tmp_path / name).kind for name in ("pgm.ckpt", "maskgit.ckpt", "vq.pt",
                                                                             "text.ckpt")}
    assert kinds == {"pgm.ckpt": "pgm", "maskgit.ckpt": "maskgit", "vq.pt": "vq", "text.ckpt": "text"}
    with pytest.raises(CheckpointError, match="not one of the paper's image checkpoints"):
        read_official_image_checkpoint(tmp_path / "text.ckpt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        read_official_text_checkpoint(tmp_path / "pgm.ckpt")
    with pytest.raises(CheckpointError, match="holds raw weights only"):
        read_official_image_checkpoint(tmp_path / "pgm.ckpt", weights="ema")
    with pytest.raises(CheckpointError, match="pre_query_mode does not apply to a maskgit"):
        read_released_checkpoint(tmp_path / "maskgit.ckpt", pre_query_mode="learn")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="none of the released checkpoints"):
        read_released_checkpoint(tmp_path / "other.pt")


def test_a_reduce_payload_in_an_image_file_is_never_run(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    monkeypatch.setenv("PGM_PWNED", str(target))
    write_image_checkpoint(tmp_path / "evil.ckpt", tiny_image_pgm(), extra={"optimizer_state_dict": Exploit()})
    model, _ = read_official_image_checkpoint(tmp_path / "evil.ckpt")
    assert not target.exists() and model is not None


def test_mis_shaped_image_tensors_are_refused_by_name(tmp_path):
    state = tiny_image_pgm().state_dict()
    state["decoder.layers.1.attn_kv.weight"] = torch.zeros(10, 32)
    del state["output_layer.linear.bias"]
    torch.save({"model_state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError) as error:
        read_official_image_checkpoint(tmp_path / "broken.ckpt")
    message = str(error.value)
    assert "1 missing tensor(s): output_layer.linear.bias" in message
    assert "decoder.layers.1.attn_kv.weight (file [10, 32], model [64, 32])" in message


def run_pgm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pgm", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_convert_and_sample_the_released_files_from_the_command_line(tmp_path):
    from PIL import Image

    write_image_checkpoint(tmp_path / "images_pgm.ckpt", tiny_image_pgm())
    write_image_checkpoint(tmp_path / "maskgit.ckpt", tiny_maskgit())
    vq = tiny_vq()
    torch.save({"model": vq.state_dict(), "args": argparse.Namespace(vq_model="VQ-8")}, tmp_path / "vq_ds8_c2i.pt")
    write_image_checkpoint(tmp_path / "small_grid.ckpt", tiny_image_pgm(length=17))
    refused = run_pgm("convert", "official", tmp_path / "small_grid.ckpt", tmp_path / "small", "--vq",
                      tmp_path / "vq_ds8_c2i.pt", "--length", "17")
    assert refused.returncode == 2 and "for this VQ it is 1025, given as length or --length" in refused.stderr
    done = run_pgm("convert", "official", tmp_path / "images_pgm.ckpt", tmp_path / "pgm", "--vq",
                   tmp_path / "vq_ds8_c2i.pt")
    assert done.returncode == 0, done.stderr
    assert "a pgm model" in done.stdout and "its tokenizer in tokenizer/" in done.stdout
    assert (tmp_path / "pgm" / "tokenizer" / "model.safetensors").is_file()
    sampled = run_pgm("sample", tmp_path / "pgm", "--classes", "1", "4", "--guidance", "3", "--steps", "4",
                      "--hide-newest", "--out", tmp_path / "grid.png")
    assert sampled.returncode == 0, sampled.stderr
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * (2 * 258 + 2), 2 * (258 + 2))  # two 256 px images, 2 px apart, upscaled 2x
    # Naming the VQ instead of holding it; and the files used as they are, with --vq.
    done = run_pgm("convert", "official", tmp_path / "images_pgm.ckpt", tmp_path / "named", "--vq",
                   tmp_path / "vq_ds8_c2i.pt", "--vq-reference")
    assert done.returncode == 0, done.stderr
    named = json.loads((tmp_path / "named" / "tokenizer" / "tokenizer_config.json").read_text())
    assert named["weights"] == str((tmp_path / "vq_ds8_c2i.pt").resolve()) and named["grid_size"] == GRID
    images = {}
    with_vq = ("--vq", tmp_path / "vq_ds8_c2i.pt")
    for source, extra in ((tmp_path / "named", ()), (tmp_path / "images_pgm.ckpt", with_vq),
                          (tmp_path / "maskgit.ckpt", (*with_vq, "--redraw"))):
        out = tmp_path / f"{source.name}.png"
        sampled = run_pgm("sample", source, "--classes", "2", "--steps", "4", "--out", out, *extra)
        assert sampled.returncode == 0, sampled.stderr
        images[source.name] = out.read_bytes()
    assert images["named"] == images["images_pgm.ckpt"]  # the same model and VQ, loaded two ways
    refused = run_pgm("sample", tmp_path / "maskgit.ckpt", "--vq", tmp_path / "vq_ds8_c2i.pt", "--hide-newest")
    assert refused.returncode == 2 and "hide_newest reproduces the authors' image PGM" in refused.stderr
    refused = run_pgm("sample", tmp_path / "images_pgm.ckpt")
    assert refused.returncode == 2 and "pass vq=PATH (--vq PATH)" in refused.stderr


def test_the_vq_file_decodes_like_the_model_it_was_saved_from(tmp_path):
    vq = tiny_vq()
    torch.save({"model": vq.state_dict(), "steps": 3}, tmp_path / "vq.pt")
    done = run_pgm("convert", "official", tmp_path / "vq.pt", tmp_path / "vq")
    assert done.returncode == 0 and "a vq model" in done.stdout, done.stderr
    codes = torch.randint(0, CODES, (2, CELLS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vq.decode_codes(codes)
        for source in (tmp_path / "vq.pt", tmp_path / "vq"):
            assert torch.equal(pgm.from_pretrained(source).decode_codes(codes), expected)
    assert os.path.getsize(tmp_path / "vq" / "model.safetensors") > 0


def test_a_converted_vq_directory_can_be_named_instead_of_copied(tmp_path):
    from pgm.pipeline import convert

    torch.save({"model": tiny_vq().state_dict()}, tmp_path / "vq.pt")
    convert(tmp_path / "vq.pt", tmp_path / "vq")
    write_image_checkpoint(tmp_path / "pgm.ckpt", tiny_image_pgm())
    out, said = convert(tmp_path / "pgm.ckpt", tmp_path / "pgm", vq=tmp_path / "vq", vq_reference=True)
    assert said.startswith("the VQ tokenizer") and not (out / "tokenizer" / "model.safetensors").exists()
    pipe = pgm.load(out)
    assert pipe.tokenizer.num_tokens == CELLS and len(pipe.generate(classes=[1], steps=2)) == 1
