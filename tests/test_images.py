"""Images: class-conditional PGM views, Halton order and schedule, guidance, inpainting, samplers."""

import math

import pytest
import torch

from pgm.models import MaskGITConfig, PartitionConfig, build_model
from pgm.models.layers import Conditioning
from pgm.sampling import SamplingOptions
from pgm.sampling.codes import generate_codes, halton_order, radical_inverse, region_mask
from pgm.sampling.common import StepCounts, arccos_bounds
from pgm.sampling.pgm import guidance_weight, guided_logits, sample_pgm
from pgm.sampling.settings import SamplerSettings

CODEBOOK, GRID, CLASSES = 12, 4, 3


def image_pgm(seed=0, **overrides):
    torch.manual_seed(seed)
    config = PartitionConfig(vocab_size=CODEBOOK + 2, length=1 + GRID * GRID, hidden_size=32, num_heads=2,
                             encoder_blocks=2, decoder_blocks=2, cond_dim=32, dropout=0.0, num_classes=CLASSES,
                             registers=2, mask_token_id=CODEBOOK, **overrides)
    model = build_model(config).eval()
    for p in model.parameters():  # zero-initialised layers would make every output equal
        torch.nn.init.normal_(p, std=0.3)
    return model


def tiny_maskgit(seed=0):
    torch.manual_seed(seed)
    config = MaskGITConfig(codebook_size=CODEBOOK, grid_size=GRID, hidden_size=32, depth=2, num_heads=2, mlp_dim=64,
                           num_classes=CLASSES, registers=1, dropout=0.0)
    model = build_model(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_halton_order_matches_the_published_vectors():
    order = halton_order(32)
    assert order[:8].tolist() == [522, 277, 771, 142, 664, 391, 913, 92]
    assert sorted(order.tolist()) == list(range(1024))
    assert radical_inverse(1, 2) == 0.5 and radical_inverse(1, 3) == pytest.approx(1 / 3)
    assert sorted(halton_order(8).tolist()) == list(range(64))


def test_arccos_schedule_matches_the_published_counts():
    counts = (arccos_bounds(torch.tensor(1024), 32).diff()).tolist()
    assert counts == [20, 20, 21, 20, 21, 20, 21, 21, 21, 22, 21, 22, 22, 23, 23, 23, 24, 24, 25, 26, 26, 28, 28,
                      30, 32, 34, 36, 40, 45, 53, 68, 164]
    for steps in (16, 32, 48, 64, 128):
        bounds = arccos_bounds(torch.tensor(1024), steps)
        assert int(bounds[-1]) == 1024 and int(bounds.diff().min()) >= 1
    # Fewer positions than steps: one per step until none is left, never more than there are.
    few = arccos_bounds(torch.tensor(5), 8).diff().tolist()
    assert sum(few) == 5 and max(few) == 1
    # Rows with different numbers of unknown positions each follow their own schedule.
    plan = StepCounts(torch.tensor([0, 24]), 64, 8, "arccos", None)
    per_row = torch.stack([plan.next(i)[0] for i in range(8)])
    assert per_row.sum(0).tolist() == [64, 40]
    assert per_row[:, 0].tolist() == arccos_bounds(torch.tensor(64), 8).diff().tolist()


def test_guidance_arithmetic_and_ramp():
    c, u = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    assert torch.equal(guided_logits(c, u, 2.0), 3 * c - 2 * u)
    assert guidance_weight(4.0, 0, 5, "linear") == 0.0
    assert guidance_weight(4.0, 4, 5, "linear") == 4.0
    assert guidance_weight(4.0, 2, 5, "linear") == 2.0
    assert guidance_weight(4.0, 0, 5, "constant") == 4.0
    with pytest.raises(ValueError, match="guidance_schedule"):
        guidance_weight(1.0, 0, 5, "cosine")


class GuidanceSpy(torch.nn.Module):
    """A 'model' whose logits depend only on the class: class c favours token c, the null class token 5."""

    def __init__(self):
        super().__init__()
        self.config = PartitionConfig(vocab_size=8, length=6, hidden_size=8, num_heads=2, encoder_blocks=1,
                                      decoder_blocks=0, cond_dim=8, num_classes=3, mask_token_id=7)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches = []

    def condition(self, labels, batch_size):
        return Conditioning(labels.reshape(-1).expand(batch_size))  # its 'adaLN input' is the label itself

    def predict(self, clean_tokens, clean_positions, query_positions, lengths=None, cond=None, check_inputs=True):
        labels = cond.vector if isinstance(cond, Conditioning) else cond
        self.batches.append(labels.tolist())
        logits = torch.zeros(*query_positions.shape, 8)
        for row, label in enumerate(labels.tolist()):
            logits[row, :, 5 if label == 3 else label] = 1.0
            logits[row, :, 6] = 0.8  # a token both branches like a little
        return logits


def test_guided_sampling_doubles_the_batch_and_mixes_the_logits():
    spy = GuidanceSpy()
    known = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 0] = True
    greedy = SamplingOptions(temperature=0)
    # Without guidance the conditional branch alone decides: token = the class.
    out = sample_pgm(spy, known_tokens=known, known_mask=mask, steps=1, cond=torch.tensor([1, 2]), options=greedy)
    assert out[:, 1:].tolist() == [[1] * 5, [2] * 5]
    assert spy.batches[-1] == [1, 2]
    # Constant guidance w = 1: (1+w) c - w u favours the class, and token 6 (liked by both) loses to it.
    out = sample_pgm(spy, known_tokens=known, known_mask=mask, steps=1, cond=torch.tensor([0, 2]), options=greedy,
                     guidance=1.0, guidance_schedule="constant")
    assert spy.batches[-1] == [0, 2, 3, 3]  # the conditional rows, then the null-class rows
    assert out[:, 1:].tolist() == [[0] * 5, [2] * 5]
    # A linear ramp skips the null rows where w = 0 (the first step).
    spy.batches.clear()
    sample_pgm(spy, known_tokens=known, known_mask=mask, steps=2, cond=torch.tensor([0, 2]), guidance=1.0)
    assert [len(b) for b in spy.batches] == [2, 4]
    with pytest.raises(ValueError, match="class-conditional"):
        sample_pgm(spy, known_tokens=known, known_mask=mask, steps=1, cond=None)


def test_class_conditional_pgm_views_agree_with_registers():
    model = image_pgm()
    tokens = torch.randint(0, CODEBOOK, (3, 1 + GRID * GRID))
    tokens[:, 0] = CODEBOOK + 1
    groups = torch.rand(3, 1 + GRID * GRID) < 0.5
    groups[:, 0] = False
    groups[2] = False  # an empty group 1: only the registers keep group 1's queries company
    groups[2, 5] = True
    labels = torch.tensor([0, 2, 3])  # 3 = the null class
    full = model(tokens, groups, labels)
    for row in range(3):
        clean, queries = (~groups[row]).nonzero()[:, 0], groups[row].nonzero()[:, 0]
        out = model.predict(tokens[row:row + 1, clean], clean[None], queries[None], cond=labels[row:row + 1])
        torch.testing.assert_close(out[0], full[row, queries], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model(tokens, groups, torch.tensor([0, 0, 0])), model(tokens, groups, torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match="class labels"):
        model(tokens, groups, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="class-conditional"):
        model(tokens, groups)


@pytest.mark.parametrize("sampler", ["halton", "confidence"])
def test_efficient_and_reference_pgm_image_sampling_agree(sampler):
    model = image_pgm(seed=1)
    labels = torch.tensor([0, 1, 2, 3])
    known_codes = torch.randint(0, CODEBOOK, (4, GRID * GRID))
    known_cells = region_mask(GRID, "top").reshape(1, -1).expand(4, -1).clone()
    known_cells[1] = False  # rows with different numbers of known cells
    outs = [generate_codes(model, labels, settings=SamplerSettings(steps=5, sampler=sampler, guidance=2.0),
                           known_codes=known_codes, known_cells=known_cells, generator=torch.Generator().manual_seed(3),
                           view=view)
            for view in ("efficient", "reference")]
    assert torch.equal(*outs)
    assert int(outs[0].max()) < CODEBOOK  # never the mask or the BOS
    assert torch.equal(outs[0][known_cells], known_codes[known_cells])


@pytest.mark.parametrize("kind", ["pgm", "maskgit"])
def test_class_modulations_are_computed_once_per_sampling_call(kind, monkeypatch):
    model = image_pgm() if kind == "pgm" else tiny_maskgit()
    modulation_layers = [module for name, module in model.named_modules()  # one per block, one in the output
                         if name.endswith("adaLN_modulation") or name == "last_norm.mlp"
                         or (name.startswith("transformer.layers.") and name.endswith(".mlp"))]
    calls = []
    for module in modulation_layers:
        module.register_forward_hook(lambda module, args, out: calls.append(module))
    labels, steps = torch.tensor([0, 2, 1]), 6

    def sample():
        calls.clear()
        return generate_codes(model, labels, settings=SamplerSettings(steps=steps, guidance=2.0),
                              generator=torch.Generator().manual_seed(3))

    cached = sample()
    # Once for the labels (step 0, where the ramped guidance is 0) and once for labels + null labels.
    assert len(modulation_layers) == (5 if kind == "pgm" else 3)
    assert len(calls) == 2 * len(modulation_layers)
    monkeypatch.setattr(model, "condition", lambda labels, batch_size: labels)  # recompute at every step
    recomputed = sample()
    assert len(calls) == steps * len(modulation_layers)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("sampler", ["halton", "confidence"])
def test_maskgit_inpainting_keeps_the_known_codes(sampler):
    model = tiny_maskgit()
    known_codes = torch.randint(0, CODEBOOK, (3, GRID * GRID))
    known_cells = region_mask(GRID, "border").reshape(1, -1).expand(3, -1)
    stats = {}
    out = generate_codes(model, torch.tensor([0, 1, 3]), settings=SamplerSettings(steps=4, sampler=sampler, guidance=1.0),
                         known_codes=known_codes, known_cells=known_cells, generator=torch.Generator().manual_seed(0),
                         stats=stats)
    assert out.shape == (3, GRID * GRID)
    assert torch.equal(out[known_cells], known_codes[known_cells])
    assert int(out.max()) < CODEBOOK and stats["forward_calls"] == 4
    assert int(region_mask(GRID, "border").sum()) == GRID * GRID - (GRID // 2) ** 2


def test_halton_sampler_decodes_in_halton_order():
    """The PGM decodes the first cells of the Halton order first: spy on the queried positions."""
    model = image_pgm()
    queried = []
    original = model.predict

    def spy(clean_tokens, clean_positions, query_positions, *args, **kwargs):
        queried.append(query_positions[0].tolist())
        return original(clean_tokens, clean_positions, query_positions, *args, **kwargs)

    model.predict = spy
    generate_codes(model, torch.tensor([0]), settings=SamplerSettings(steps=8, sampler="halton"),
                   generator=torch.Generator().manual_seed(0))
    order = [1 + cell for cell in halton_order(GRID).tolist()]  # position 0 is the BOS
    assert [p for step in queried for p in step] == order
    counts = arccos_bounds(torch.tensor(GRID * GRID), 8).diff().tolist()
    assert [len(step) for step in queried] == [c for c in counts if c]


def test_image_objectives_score_what_they_should():
    from pgm.objectives import ImagePartitionObjective, MaskGITObjective, arccos_share

    assert float(arccos_share(torch.tensor(0.0))) == 1.0 and float(arccos_share(torch.tensor(1.0))) == 0.0
    model = image_pgm()
    tokens = torch.randint(0, CODEBOOK, (4, 1 + GRID * GRID))
    tokens[:, 0] = CODEBOOK + 1
    labels = torch.tensor([0, 1, 2, 0])
    out = ImagePartitionObjective().loss(model, tokens, labels=labels, generator=torch.Generator().manual_seed(0))
    assert int(out.tokens) == 4 * GRID * GRID  # every code of both groups, never the BOS
    assert math.isfinite(float(out.loss.detach())) and float(out.loss.detach()) > 0
    maskgit = tiny_maskgit()
    noise = MaskGITObjective().draw_noise(4, 1 + GRID * GRID, generator=torch.Generator().manual_seed(0))
    masked = MaskGITObjective().loss(maskgit, tokens, labels=labels, noise=noise)
    hidden = int((noise.u[:, 1:] < arccos_share(noise.t)[:, None]).sum())
    assert int(masked.tokens) == hidden > 0
    with pytest.raises(ValueError, match="labelled"):
        ImagePartitionObjective().loss(model, tokens)


# ---------------------------------------------------------------------------------------------
# The image pipeline from the command line: VQ -> PGM and MaskGIT on its codes -> PNG and FD
# ---------------------------------------------------------------------------------------------

def test_image_runs_share_one_cached_encoding(image_runs):
    import numpy as np

    caches = list((image_runs / "vq" / "token-cache").iterdir())
    assert len(caches) == 1  # the MaskGIT run reused what the PGM run encoded
    pgm_rows = np.fromfile(image_runs / "pgm" / "data" / "train.bin", dtype=np.uint8)
    maskgit_rows = np.fromfile(image_runs / "maskgit" / "data" / "train.bin", dtype=np.uint8)
    assert np.array_equal(pgm_rows, maskgit_rows) and pgm_rows.size == 256 * 65


def test_sample_writes_a_png_grid_and_inpaints(image_runs):
    from PIL import Image
    from test_cli import assert_clean_failure, pgm

    out = image_runs / "grid.png"
    result = pgm("sample", str(image_runs / "pgm"), "--classes", "0", "sneaker", "none", "--guidance", "2",
                 "--steps", "8", "--num-samples", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "6 images (T-shirt/top, Sneaker, none)" in result.stdout
    with Image.open(out) as picture:  # 2 rows of 3 images of 32 px, 2 px apart, upscaled 2x
        assert picture.size == (2 * (3 * 34 + 2), 2 * (2 * 34 + 2))
    result = pgm("sample", str(image_runs / "maskgit"), "--known", "top", "--images", "3", "--sampler",
                 "confidence", "--steps", "4", "--out", str(image_runs / "inpainted.png"))
    assert result.returncode == 0, result.stderr
    assert_clean_failure(pgm("sample", str(image_runs / "pgm"), "--classes", "11"), "unknown class '11'")
    assert_clean_failure(pgm("sample", str(image_runs / "vq")), "VQ autoencoder")


def test_eval_reports_psnr_usage_and_classifier_fd(image_runs):
    from test_cli import assert_clean_failure, pgm

    from pgm.data.image_sets import fit_size, load_fashion_mnist
    from pgm.eval.fid import train_classifier

    images, labels = load_fashion_mnist("test")
    classifier, _ = train_classifier(fit_size(images[:512], 32), labels[:512], fit_size(images[512:640], 32),
                                     labels[512:640], epochs=1, log=lambda *a: None)
    classifier.save_pretrained(image_runs / "classifier")
    result = pgm("eval", str(image_runs / "vq"), "--fid", "--classifier", str(image_runs / "classifier"))
    assert result.returncode == 0, result.stderr
    assert "PSNR" in result.stdout and "codes used" in result.stdout and "reconstructions" in result.stdout
    result = pgm("eval", str(image_runs / "maskgit"), "--fid", "--classifier", str(image_runs / "classifier"),
                 "--num-samples", "8", "--steps", "4", "--passes", "1", "--temperature", "0.5")
    assert result.returncode == 0, result.stderr
    assert "FD (classifier features)" in result.stdout and "VQ floor" in result.stdout
    assert "temperature 0.5" in result.stdout
    assert_clean_failure(pgm("eval", str(image_runs / "pgm"), "--fid", "--classifier", str(image_runs / "nothing")),
                         "nothing")


def test_image_data_refuses_overlapping_splits_and_bad_labels(tmp_path):
    import numpy as np
    from PIL import Image

    from pgm.data import DataConfig
    from pgm.data.image_rows import split_images
    from pgm.errors import DataError

    with pytest.raises(DataError, match="same images"):
        split_images(DataConfig(source="fashion-mnist", split="test", val_split="validation", tokenizer="pixels"),
                     train_split=True)
    for name in ("cat", "dog"):  # a folder source: classes from sub-folders, every 4th image held out
        (tmp_path / name).mkdir()
        for i in range(8):
            Image.fromarray(np.full((20, 24), 30 * i, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    config = DataConfig(source=str(tmp_path), tokenizer="pixels", image_size=16, val_every=4, limit_images=6)
    images, labels, classes = split_images(config, train_split=True)
    assert classes == ["cat", "dog"] and images.shape == (6, 1, 16, 16)
    assert set(labels.tolist()) == {0, 1}  # the limit keeps both classes: the order is shuffled first
    held_out, _, _ = split_images(config.replace(limit_images=0), train_split=False)
    assert len(held_out) == 4


def test_first_step_temperature_scale_multiplies_the_users_temperature():
    spy = GuidanceSpy()
    known = torch.zeros(64, 6, dtype=torch.long)
    mask = torch.zeros(64, 6, dtype=torch.bool)
    mask[:, 0] = True
    labels = torch.ones(64, dtype=torch.long)
    drawn = [sample_pgm(spy, known_tokens=known, known_mask=mask, steps=1, cond=labels, options=SamplingOptions(t),
                        first_step_temperature_scale=scale, generator=torch.Generator().manual_seed(0))
             for t, scale in ((0.5, 2.0), (1.0, 1.0), (0.05, 1.0))]
    assert torch.equal(drawn[0], drawn[1])  # 0.5 x 2 is temperature 1
    assert not torch.equal(drawn[1], drawn[2])
