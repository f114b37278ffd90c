import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F

from pgm.errors import ConfigError
from pgm.eval.image_metrics import code_statistics
from pgm.importers import load_llamagen_vq
from pgm.models.vq import VQConfig, VQModel

SMALL = dict(in_channels=1, image_size=32, channels=32, channel_multipliers=[1, 2, 2], encoder_res_blocks=1,
             decoder_res_blocks=1, z_channels=16, codebook_size=64, codebook_dim=8, norm_groups=8,
             codebook_usage_window=256)


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine's cores are shared: oversubscribed intra-op threads make these convolutions
    # an order of magnitude slower than a single thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(**overrides) -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQConfig(**{**SMALL, **overrides}))


def small_images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message and not re.search(r"[.!?]\s", message), message


# ---------------------------------------------------------------- the VQ-8 state_dict of §1.7

def group_norm_keys(prefix, channels):
    return [(f"{prefix}.weight", [channels]), (f"{prefix}.bias", [channels])]


def conv_keys(prefix, out_channels, in_channels, kernel):
    return [(f"{prefix}.weight", [out_channels, in_channels, kernel, kernel]), (f"{prefix}.bias", [out_channels])]


def res_keys(prefix, cin, cout):
    keys = (group_norm_keys(f"{prefix}.norm1", cin) + conv_keys(f"{prefix}.conv1", cout, cin, 3)
            + group_norm_keys(f"{prefix}.norm2", cout) + conv_keys(f"{prefix}.conv2", cout, cout, 3))
    # The starred (nin_shortcut) blocks of §1.7 are exactly those that change the width.
    if cin != cout:
        keys += conv_keys(f"{prefix}.nin_shortcut", cout, cin, 1)
    return keys


def attn_keys(prefix, channels):
    keys = group_norm_keys(f"{prefix}.norm", channels)
    for name in ("q", "k", "v", "proj_out"):
        keys += conv_keys(f"{prefix}.{name}", channels, channels, 1)
    return keys


def mid_keys(prefix):
    return res_keys(f"{prefix}.0", 512, 512) + attn_keys(f"{prefix}.1", 512) + res_keys(f"{prefix}.2", 512, 512)


def vq8_listing():
    """(name, shape) of every state_dict entry, in registration order, typed in from §1.7."""
    encoder_res = {0: [(128, 128), (128, 128)], 1: [(128, 256), (256, 256)], 2: [(256, 256), (256, 256)],
                   3: [(256, 512), (512, 512)]}
    encoder_downsample = {0: 128, 1: 256, 2: 256}
    keys = conv_keys("encoder.conv_in", 128, 3, 3)
    for level, widths in encoder_res.items():
        prefix = f"encoder.conv_blocks.{level}"
        for r, (cin, cout) in enumerate(widths):
            keys += res_keys(f"{prefix}.res.{r}", cin, cout)
        if level == 3:
            keys += attn_keys(f"{prefix}.attn.0", 512) + attn_keys(f"{prefix}.attn.1", 512)
        else:
            width = encoder_downsample[level]
            keys += conv_keys(f"{prefix}.downsample.conv", width, width, 3)
    keys += mid_keys("encoder.mid")
    keys += group_norm_keys("encoder.norm_out", 512) + conv_keys("encoder.conv_out", 256, 512, 3)

    decoder_first_res = {0: (512, 512), 1: (512, 256), 2: (256, 256), 3: (256, 128)}
    decoder_upsample = {0: 512, 1: 256, 2: 256}
    keys += conv_keys("decoder.conv_in", 512, 256, 3)
    keys += mid_keys("decoder.mid")
    for j, (cin, cout) in decoder_first_res.items():
        prefix = f"decoder.conv_blocks.{j}"
        keys += res_keys(f"{prefix}.res.0", cin, cout)
        keys += res_keys(f"{prefix}.res.1", cout, cout) + res_keys(f"{prefix}.res.2", cout, cout)
        if j == 0:
            keys += attn_keys(f"{prefix}.attn.0", 512) + attn_keys(f"{prefix}.attn.1", 512)
            keys += attn_keys(f"{prefix}.attn.2", 512)
        if j in decoder_upsample:
            width = decoder_upsample[j]
            keys += conv_keys(f"{prefix}.upsample.conv", width, width, 3)
    keys += group_norm_keys("decoder.norm_out", 128) + conv_keys("decoder.conv_out", 3, 128, 3)

    # A module lists its own buffers before its children's tensors, so the quantizer's buffer
    # precedes its embedding table in any state_dict, LlamaGen's included.
    keys += [("quantize.codebook_used", [65536]), ("quantize.embedding.weight", [16384, 8])]
    keys += conv_keys("quant_conv", 8, 256, 1) + conv_keys("post_quant_conv", 256, 8, 1)
    return keys


def count(listing, prefix=""):
    return sum(torch.Size(shape).numel() for name, shape in listing
               if name.startswith(prefix) and name != "quantize.codebook_used")


def test_vq8_state_dict_matches_the_llamagen_listing_in_names_shapes_and_order():
    expected = vq8_listing()
    # The listing itself reproduces §1.1's totals, so a typo in it cannot hide a model error.
    assert len(expected) == 300
    assert (count(expected), count(expected, "encoder."), count(expected, "decoder.")) == (
        70_109_835, 28_559_232, 41_415_171)
    with torch.device("meta"):
        model = VQModel(VQConfig())
    state = model.state_dict()
    assert [(name, list(tensor.shape)) for name, tensor in state.items()] == expected
    assert model.num_parameters() == 70_109_835
    assert [name for name, _ in model.named_children()] == ["encoder", "decoder", "quantize", "quant_conv",
                                                            "post_quant_conv"]
    buffers = dict(model.named_buffers())
    assert list(buffers) == ["quantize.codebook_used"]
    assert buffers["quantize.codebook_used"].dtype == torch.float32
    assert "quantize.codebook_used" not in dict(model.named_parameters())
    assert (model.config.grid_size, model.config.num_tokens) == (32, 1024)


# ---------------------------------------------------------------- configuration

def test_config_takes_channel_multipliers_as_a_list_of_integers():
    assert VQConfig(**{**SMALL, "channel_multipliers": (1, 2, 2)}).channel_multipliers == [1, 2, 2]
    assert VQConfig.parse_value("channel_multipliers", "1,2,2,4") == [1, 2, 2, 4]
    config = VQConfig(**SMALL)
    assert VQConfig.from_dict(config.to_dict()) == config and config.to_dict()["kind"] == "vq"
    for bad in ([1, 2.0, 2], [True, 2, 2], "1,2,2"):
        with pytest.raises(ConfigError, match="list of integers"):
            VQConfig(**{**SMALL, "channel_multipliers": bad})
    with pytest.raises(ConfigError, match="comma-separated integers"):
        VQConfig.parse_value("channel_multipliers", "1,two")


@pytest.mark.parametrize("change,message", [
    (dict(norm_groups=5), "not divisible by norm_groups"),
    (dict(image_size=30), "not divisible by the downsampling factor 4"),
    (dict(channel_multipliers=[]), "at least one level"),
    (dict(channel_multipliers=[1, 0]), "must be positive"),
    (dict(codebook_size=0), "codebook_size must be positive"),
])
def test_config_rejects_impossible_shapes(change, message):
    with pytest.raises(ConfigError, match=message):
        VQConfig(**{**SMALL, **change})


# ---------------------------------------------------------------- loading LlamaGen checkpoints

def test_load_llamagen_vq_restores_every_tensor(tmp_path):
    source = small_model()
    with torch.no_grad():
        source.quantize.codebook_used.copy_(torch.arange(256.0) % 64)
    path = tmp_path / "vq.pt"
    torch.save({"model": source.state_dict(), "steps": 10, "args": {"vq_model": "VQ-small"}}, path)
    torch.manual_seed(99)  # the loaded model starts from different random weights
    loaded = load_llamagen_vq(path, VQConfig(**SMALL))
    assert not loaded.training
    assert list(loaded.state_dict()) == list(source.state_dict())
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_load_llamagen_vq_refuses_mismatched_or_foreign_files(tmp_path):
    config = VQConfig(**SMALL)
    state = small_model().state_dict()

    def refusal(payload, name="bad.pt"):
        path = tmp_path / name
        if isinstance(payload, bytes):
            path.write_bytes(payload)
        else:
            torch.save(payload, path)
        with pytest.raises(ValueError) as error:
            load_llamagen_vq(path, config)
        message = str(error.value)
        assert_one_sentence(message)
        return message

    missing = refusal({"model": {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}})
    assert "1 missing tensor(s): decoder.conv_out.bias" in missing
    misshaped = refusal({"model": {**state, "quantize.embedding.weight": torch.zeros(65, 8)}})
    assert "quantize.embedding.weight (file [65, 8], model [64, 8])" in misshaped
    unexpected = refusal({"model": {**state, "quantize.ema": torch.zeros(3)}})
    assert "1 unexpected tensor(s): quantize.ema" in unexpected
    assert "expected a dict with a 'model' state_dict" in refusal(state)
    assert "not a PyTorch checkpoint" in refusal(b"this is a text file, not a checkpoint")
    # Without a configuration, the shapes tell it (the image size and groups cannot: VQ-8's by default).
    torch.save({"model": state}, tmp_path / "small.pt")
    inferred = load_llamagen_vq(tmp_path / "small.pt", norm_groups=8, image_size=32).config
    assert inferred == config
    defaults = load_llamagen_vq(tmp_path / "small.pt").config
    assert (defaults.norm_groups, defaults.image_size) == (32, 256)
    assert defaults.replace(norm_groups=8, image_size=32) == config


def test_load_llamagen_vq_reads_the_training_scripts_extras_without_running_them(tmp_path):
    # LlamaGen's training script saves its argparse namespace beside the weights.
    state = small_model().state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "args": argparse.Namespace(lr=1e-4),
                "steps": 7}, tmp_path / "trained.pt")
    loaded = load_llamagen_vq(tmp_path / "trained.pt", VQConfig(**SMALL))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- encoding, quantizing, decoding

# A functional forward written from §1.2-1.4, reading the weights by name.

def reference_group_norm(weights, prefix, x):
    return F.group_norm(x, SMALL["norm_groups"], weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], eps=1e-6)


def reference_conv(weights, prefix, x, **options):
    return F.conv2d(x, weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], **options)


def swish(x):
    return x * torch.sigmoid(x)


def reference_res(weights, prefix, x):
    h = swish(reference_group_norm(weights, f"{prefix}.norm1", x))
    h = reference_conv(weights, f"{prefix}.conv1", h, padding=1)
    h = swish(reference_group_norm(weights, f"{prefix}.norm2", h))
    h = reference_conv(weights, f"{prefix}.conv2", h, padding=1)
    skip = reference_conv(weights, f"{prefix}.nin_shortcut", x) if f"{prefix}.nin_shortcut.weight" in weights else x
    return skip + h


def reference_attn(weights, prefix, x):
    batch, channels, height, width = x.shape
    h = reference_group_norm(weights, f"{prefix}.norm", x)
    q, k, v = (reference_conv(weights, f"{prefix}.{name}", h).reshape(batch, channels, -1) for name in "qkv")
    attention = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(channels), dim=2)  # [B, query, key]
    out = torch.einsum("bij,bcj->bci", attention, v).reshape(x.shape)
    return x + reference_conv(weights, f"{prefix}.proj_out", out)


def reference_level(weights, prefix, x):
    r = 0
    while f"{prefix}.res.{r}.conv1.weight" in weights:
        x = reference_res(weights, f"{prefix}.res.{r}", x)
        if f"{prefix}.attn.{r}.q.weight" in weights:
            x = reference_attn(weights, f"{prefix}.attn.{r}", x)
        r += 1
    if f"{prefix}.downsample.conv.weight" in weights:
        x = reference_conv(weights, f"{prefix}.downsample.conv", F.pad(x, (0, 1, 0, 1)), stride=2)
    if f"{prefix}.upsample.conv.weight" in weights:
        x = reference_conv(weights, f"{prefix}.upsample.conv", x.repeat_interleave(2, 2).repeat_interleave(2, 3),
                           padding=1)
    return x


def reference_mid_and_out(weights, prefix, h, levels, mid_first):
    def mid(h):
        h = reference_res(weights, f"{prefix}.mid.0", h)
        return reference_res(weights, f"{prefix}.mid.2", reference_attn(weights, f"{prefix}.mid.1", h))

    h = reference_conv(weights, f"{prefix}.conv_in", h, padding=1)
    h = mid(h) if mid_first else h
    for level in range(levels):
        h = reference_level(weights, f"{prefix}.conv_blocks.{level}", h)
    h = h if mid_first else mid(h)
    return reference_conv(weights, f"{prefix}.conv_out", swish(reference_group_norm(weights, f"{prefix}.norm_out", h)),
                          padding=1)


def test_model_matches_a_functional_forward_written_from_the_specification():
    model = small_model().double().eval()
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    images = small_images(2).double()
    latents = reference_mid_and_out(weights, "encoder", images, 3, mid_first=False)
    latents = F.normalize(reference_conv(weights, "quant_conv", latents), dim=1)  # [B, 8, 8, 8]
    codebook = F.normalize(weights["quantize.embedding.weight"], dim=1)
    distances = torch.cdist(latents.permute(0, 2, 3, 1).reshape(-1, 8), codebook)
    expected_codes = distances.argmin(1).reshape(2, 64)
    grid = codebook[expected_codes].reshape(2, 8, 8, 8).permute(0, 3, 1, 2)
    expected_images = reference_mid_and_out(weights, "decoder", reference_conv(weights, "post_quant_conv", grid), 3,
                                            mid_first=True)
    with torch.no_grad():
        assert torch.equal(model.encode(images), expected_codes)
        torch.testing.assert_close(model.decode_codes(expected_codes), expected_images, rtol=1e-10, atol=1e-10)


def test_encode_gives_a_row_major_grid_and_decode_matches_forward():
    model = small_model().eval()
    images = small_images(3)
    with torch.no_grad():
        codes = model.encode(images)
        output = model(images)
        decoded = model.decode_codes(codes)
        grid = model.quantize_latents(model.quant_conv(model.encoder(images)))[0]
        decoded_grid = model.decode_codes(codes.reshape(3, 8, 8))
    assert codes.shape == (3, 64) and codes.dtype == torch.long
    assert torch.equal(output.codes, codes)
    assert decoded.shape == images.shape
    torch.testing.assert_close(decoded, output.reconstruction, rtol=0, atol=1e-6)
    torch.testing.assert_close(decoded_grid, decoded, rtol=0, atol=0)
    # Code p = row*w + col is the codebook row quantizing latent cell (row, col).
    codebook = F.normalize(model.quantize.embedding.weight.detach(), dim=-1)
    for row in range(8):
        for col in range(8):
            torch.testing.assert_close(grid[:, :, row, col], codebook[codes[:, row * 8 + col]])


def test_quantizer_picks_the_nearest_normalised_codebook_row():
    model = small_model()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(torch.randn(64, 8, generator=generator) * 3)  # not unit norm
    latents = torch.randn(2, 8, 3, 5, generator=generator) * 4  # a non-square grid exposes a transposed layout
    quantized, codes, codebook_loss, commitment_loss = model.quantize_latents(latents)
    assert codes.shape == (2, 15) and quantized.shape == latents.shape
    codebook = model.quantize.embedding.weight.detach()
    codebook = codebook / codebook.norm(dim=1, keepdim=True)
    squared_error = 0.0
    for b in range(2):
        for row in range(3):
            for col in range(5):
                vector = latents[b, :, row, col] / latents[b, :, row, col].norm()
                distances = [float((vector - entry).pow(2).sum()) for entry in codebook]
                best = min(range(64), key=distances.__getitem__)
                assert int(codes[b, row * 5 + col]) == best
                torch.testing.assert_close(quantized[b, :, row, col].detach(), codebook[best])
                squared_error += distances[best]
    mean_squared_error = squared_error / (2 * 15 * 8)
    assert codebook_loss.item() == pytest.approx(mean_squared_error, rel=1e-5)
    assert commitment_loss.item() == pytest.approx(0.25 * mean_squared_error, rel=1e-5)


def test_straight_through_gradients_reach_the_encoder_and_the_losses_reach_their_sides():
    model = small_model().train()
    output = model(small_images())
    output.reconstruction.pow(2).mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # the decoder sees the codebook rows as constants
    model.zero_grad(set_to_none=True)
    output = model(small_images())
    output.codebook_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad is None
    model.zero_grad(set_to_none=True)
    output = model(small_images())
    output.commitment_loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None


def test_decode_codes_refuses_out_of_range_or_misshaped_codes():
    model = small_model()
    with pytest.raises(ValueError, match=r"codes holds the code id 64, outside \[0, 64\)"):
        model.decode_codes(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match="grid is 8x8 = 64"):
        model.decode_codes(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model.decode_codes(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="H and W divisible by 4"):
        model.encode(torch.zeros(1, 1, 30, 32))


# ---------------------------------------------------------------- usage bookkeeping

def test_codebook_usage_window_is_a_fifo_of_training_codes():
    model = small_model()
    used = model.quantize.codebook_used
    assert torch.equal(used, torch.full((256,), -1.0)) and model.codebook_usage() == 0.0
    model.train()
    first = model(small_images(2, seed=1)).codes  # 128 codes
    assert torch.equal(used[:128], torch.full((128,), -1.0))
    assert torch.equal(used[128:], first.flatten().float())
    assert model.codebook_usage() == first.unique().numel() / 64
    second = model(small_images(2, seed=2)).codes
    third = model(small_images(2, seed=3)).codes
    assert torch.equal(used, torch.cat([second.flatten(), third.flatten()]).float())
    assert model.codebook_usage() == torch.cat([second, third]).unique().numel() / 64
    model.eval()
    model(small_images(2, seed=4))
    assert torch.equal(used, torch.cat([second.flatten(), third.flatten()]).float())  # eval records nothing
    model.quantize.record(torch.arange(300) % 64)  # more codes than the window keeps their newest 256
    assert torch.equal(used, (torch.arange(44, 300) % 64).float())
    assert model.codebook_usage() == 1.0


def test_code_statistics_reports_usage_and_perplexity():
    usage, perplexity = code_statistics(torch.tensor([[0, 0, 1, 1]]), 4)
    assert usage == 0.5 and perplexity == pytest.approx(2.0)
    usage, perplexity = code_statistics(torch.tensor([3, 3, 3, 3, 3, 3, 3, 1]), 8)
    entropy = -(7 / 8 * math.log(7 / 8) + 1 / 8 * math.log(1 / 8))
    assert usage == 0.25 and perplexity == pytest.approx(math.exp(entropy))
    assert code_statistics(torch.arange(16), 16) == (1.0, pytest.approx(16.0))
    with pytest.raises(ValueError, match="outside"):
        code_statistics(torch.tensor([4]), 4)


# ---------------------------------------------------------------- learning

def test_a_tiny_vq_learns_to_reconstruct_fashion_mnist():
    from pgm.data.image_sets import load_fashion_mnist
    from pgm.errors import DataError

    try:
        images, _ = load_fashion_mnist("train")
    except DataError as error:
        pytest.skip(str(error))
    # 64 images at 14x14 (2x2 average pooling) keep each step cheap.
    x = F.avg_pool2d(torch.from_numpy(images[:64]).float() / 127.5 - 1, 2)
    torch.manual_seed(0)
    model = VQModel(VQConfig(in_channels=1, image_size=14, channels=8, channel_multipliers=[1, 2],
                             encoder_res_blocks=1, decoder_res_blocks=1, z_channels=16, codebook_size=64,
                             norm_groups=4, codebook_usage_window=4096))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def reconstruction_error() -> float:
        model.eval()
        with torch.no_grad():
            return F.mse_loss(model(x).reconstruction, x).item()

    before = reconstruction_error()
    model.train()
    for _ in range(24):
        output = model(x)
        loss = F.mse_loss(output.reconstruction, x) + output.codebook_loss + output.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = reconstruction_error()
    mean_image_error = F.mse_loss(x.mean(0, keepdim=True).expand_as(x), x).item()
    assert after < 0.3 * before
    # Beating the best constant image means the codes carry information about each image.
    assert after < 0.6 * mean_image_error
    assert model.codebook_usage() > 0.05
