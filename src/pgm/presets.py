"""Named run configurations: `pgm train --preset NAME`.

- `text-tiny`: seconds; what the tests train.
- `text-small` (PGM), `mdlm-small` and `ar-small` (parameters within 5%): the main job on the
  built-in corpus, about ten minutes on two CPU cores.
- `fmnist-vq`, then `fmnist-pgm` and `fmnist-maskgit` (parameters within 5%, same budget):
  images. A VQ autoencoder turns Fashion-MNIST (28x28 padded to 32x32) into 8x8 grids of
  256 codes; a class-conditional PGM and the MaskGIT baseline learn those grids. About ten
  minutes each on two CPU cores. `vq-tiny`, `image-pgm-tiny`, `maskgit-tiny`: what the tests train.
- `distill-tiny` (tests) and `distill-small` (the built-in corpus, four rounds from 128 steps
  to 8): the settings of `pgm distill`, whose model and data are the teacher's.
- The paper's shapes and hyper-parameters for GPU users (reference: 1M steps, global batch
  512, AdamW lr 3e-4 with 2.5k warm-up then constant, no weight decay, EMA 0.9999, dropout 0.1,
  gradient clipping 1): OpenWebText with GPT-2's tokenizer at length 1024 (wrapped, the last
  100k documents held out) and LM1B with bert-base-uncased at length 128 (padded).
"""

from __future__ import annotations

from pathlib import Path

from .data import DataConfig
from .errors import ConfigError
from .models import CausalConfig, MaskedDiffusionConfig, MaskGITConfig, PartitionConfig, VQConfig
from .runs import RunConfig
from .train_config import DistillConfig, TrainConfig


def _small_model(kind: str, **overrides):
    shape = dict(vocab_size=4097, length=128, hidden_size=192, num_heads=4, cond_dim=128, dropout=0.0)
    shape.update(overrides)
    if kind == "pgm":
        return PartitionConfig(encoder_blocks=3, decoder_blocks=3, **shape)
    if kind == "ar":
        return CausalConfig(blocks=6, **shape)
    return MaskedDiffusionConfig(blocks=6, **shape)


def _small(kind: str) -> RunConfig:
    return RunConfig(
        model=_small_model(kind),
        data=DataConfig(tokenizer="bpe", vocab_size=4096, packing="wrap"),
        train=TrainConfig(batch_size=32, max_steps=400, lr=2e-3, warmup_steps=50, schedule="constant",
                          ema=0.999, eval_every=100, eval_rows=128, save_every=100, log_every=10),
    )


def _tiny(kind: str) -> RunConfig:
    return RunConfig(
        model=_small_model(kind, vocab_size=385, length=32, hidden_size=32, num_heads=2, cond_dim=16),
        data=DataConfig(tokenizer="bpe", vocab_size=384, limit_documents=40),
        train=TrainConfig(batch_size=8, max_steps=20, lr=3e-3, warmup_steps=5, ema=0.99, eval_every=10,
                          eval_rows=16, save_every=10, log_every=1, progress=False),
    )


def _paper(kind: str, dataset: str, **model) -> RunConfig:
    owt = dataset == "owt"
    data = (DataConfig(source="hf:Skylion007/openwebtext", tokenizer="gpt2", val_last=100_000, chunk_chars=0, packing="wrap")
            if owt else
            DataConfig(source="hf:lm1b", val_source="hf:lm1b", val_split="test", tokenizer="hf:bert-base-uncased",
                       chunk_chars=0, packing="pad"))
    shape = dict(vocab_size=50258 if owt else 30522, length=1024 if owt else 128, cond_dim=128, dropout=0.1,
                 mask_token_id=None if owt else 103)
    shape.update(model)
    config = PartitionConfig(**shape) if kind == "pgm" else MaskedDiffusionConfig(**shape)
    return RunConfig(model=config, data=data,
                     train=TrainConfig(batch_size=512, max_steps=1_000_000, lr=3e-4, warmup_steps=2500,
                                       schedule="constant", weight_decay=0.0, grad_clip=1.0, ema=0.9999,
                                       eval_every=20_000, eval_rows=4096, save_every=5000, log_every=100,
                                       bos_always_clean=False))


def _image_data(tokenizer: str, limit: int = 0) -> DataConfig:
    return DataConfig(source="fashion-mnist", split="train", val_split="test", tokenizer=tokenizer, image_size=32,
                      channels=1, limit_images=limit)


def _vq(tiny: bool) -> RunConfig:
    if tiny:
        model = VQConfig(in_channels=1, image_size=32, channels=16, channel_multipliers=[1, 1, 2], encoder_res_blocks=1,
                         decoder_res_blocks=1, z_channels=16, codebook_size=32, codebook_dim=4, norm_groups=8)
        train = TrainConfig(batch_size=16, max_steps=8, lr=2e-3, warmup_steps=2, ema=0.0, eval_every=0, eval_rows=16,
                            save_every=0, log_every=1, progress=False)
        return RunConfig(model=model, data=_image_data("pixels", 256), train=train)
    model = VQConfig(in_channels=1, image_size=32, channels=32, channel_multipliers=[1, 2, 2], encoder_res_blocks=1,
                     decoder_res_blocks=1, z_channels=64, codebook_size=256, codebook_dim=8, norm_groups=16)
    train = TrainConfig(batch_size=64, max_steps=500, lr=1e-3, warmup_steps=50, schedule="cosine", ema=0.0,
                        grad_clip=1.0, eval_every=250, eval_rows=1024, save_every=250, log_every=10)
    return RunConfig(model=model, data=_image_data("pixels"), train=train)


def _image_model(kind: str, tiny: bool) -> RunConfig:
    vq = "vq:runs/vq-tiny" if tiny else "vq:runs/fmnist-vq"
    shape = (dict(hidden_size=32, num_heads=2, cond_dim=32) if tiny else dict(hidden_size=128, num_heads=4, cond_dim=128))
    if kind == "pgm":
        # 2 + 4 rather than 3 + 3: same parameters, lower validation loss (2.107 vs 2.128 nats
        # per code after 800 steps) and less work per sampling step (the encoder runs on the clean set).
        encoder_blocks, decoder_blocks = (1, 1) if tiny else (2, 4)
        # vocab_size and length are placeholders: the VQ tokenizer decides them.
        model = PartitionConfig(vocab_size=258, length=65, mask_token_id=256, encoder_blocks=encoder_blocks,
                                decoder_blocks=decoder_blocks, dropout=0.0, num_classes=10, registers=2, mlp_ratio=4,
                                **shape)
    else:
        model = MaskGITConfig(codebook_size=256, grid_size=8, hidden_size=shape["hidden_size"],
                              num_heads=shape["num_heads"], depth=2 if tiny else 5, mlp_dim=4 * shape["hidden_size"],
                              num_classes=10, registers=1, dropout=0.0)
    if tiny:
        train = TrainConfig(batch_size=16, max_steps=6, lr=2e-3, warmup_steps=2, ema=0.0, eval_every=0, eval_rows=16,
                            save_every=0, log_every=1, progress=False)
    else:
        # No EMA: at these 800 steps averaged weights (0.999, a window of about 90 steps) sampled
        # worse for the PGM (FD 75.5 instead of 70.1, 5000 samples) and no better for MaskGIT (63.3
        # vs 63.0). Trained 3200 steps, MaskGIT gains from it (39.8 vs 42.1), the PGM still not.
        train = TrainConfig(batch_size=64, max_steps=800, lr=1e-3, warmup_steps=50, schedule="cosine", ema=0.0,
                            eval_every=200, eval_rows=1024, save_every=200, log_every=10, weight_decay=0.0)
    return RunConfig(model=model, data=_image_data(vq, 256 if tiny else 0), train=train)


def _imagenet(kind: str, **blocks):
    """The shapes of the authors' released ImageNet 256 models (LlamaGen VQ-8 codes: 32 x 32 grids of
    16384 codes; 1000 classes): the image PGM (494.2M parameters) and the Halton-MaskGIT baseline
    (480.4M). For `pgm bench images --shape`; the released weights themselves are imported with
    `pgm convert official`."""
    if kind == "pgm":
        return PartitionConfig(vocab_size=16386, length=1025, mask_token_id=16384, hidden_size=1024, num_heads=16,
                               cond_dim=1024, dropout=0.1, num_classes=1000, registers=2, **blocks)
    return MaskGITConfig(codebook_size=16384, grid_size=32, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096,
                         num_classes=1000, registers=1, dropout=0.1)


IMAGE_SHAPES = {
    "imagenet-12-12": lambda: _imagenet("pgm", encoder_blocks=12, decoder_blocks=12),
    "imagenet-14-10": lambda: _imagenet("pgm", encoder_blocks=14, decoder_blocks=10),
    "imagenet-maskgit": lambda: _imagenet("maskgit"),
}


PRESETS = {
    "text-tiny": lambda: _tiny("pgm"),
    "mdlm-tiny": lambda: _tiny("mdlm"),
    "ar-tiny": lambda: _tiny("ar"),
    "text-small": lambda: _small("pgm"),
    "mdlm-small": lambda: _small("mdlm"),
    "ar-small": lambda: _small("ar"),
    "fmnist-vq": lambda: _vq(tiny=False),
    "fmnist-pgm": lambda: _image_model("pgm", tiny=False),
    "fmnist-maskgit": lambda: _image_model("maskgit", tiny=False),
    "vq-tiny": lambda: _vq(tiny=True),
    "image-pgm-tiny": lambda: _image_model("pgm", tiny=True),
    "maskgit-tiny": lambda: _image_model("maskgit", tiny=True),
    "pgm-owt-8-8": lambda: _paper("pgm", "owt", hidden_size=768, num_heads=12, encoder_blocks=8, decoder_blocks=8),
    "pgm-owt-6-6-1024": lambda: _paper("pgm", "owt", hidden_size=1024, num_heads=16, encoder_blocks=6,
                                       decoder_blocks=6),
    "mdlm-owt": lambda: _paper("mdlm", "owt", hidden_size=768, num_heads=12, blocks=12),
    "pgm-lm1b-6-6": lambda: _paper("pgm", "lm1b", hidden_size=768, num_heads=12, encoder_blocks=6, decoder_blocks=6),
    "pgm-lm1b-6-6-mean": lambda: _paper("pgm", "lm1b", hidden_size=768, num_heads=12, encoder_blocks=6,
                                        decoder_blocks=6, pre_query_mode="learn+freqs+mean"),
    "pgm-lm1b-6-6-logsumexp": lambda: _paper("pgm", "lm1b", hidden_size=768, num_heads=12, encoder_blocks=6,
                                             decoder_blocks=6, pre_query_mode="learn+freqs+logsumexp"),
    "mdlm-lm1b": lambda: _paper("mdlm", "lm1b", hidden_size=768, num_heads=12, blocks=12),
}


def _distillation(tiny: bool) -> tuple[TrainConfig, DistillConfig]:
    """SDTT's settings on a small scale: KL(student || teacher), two teacher steps per student
    step, a constant learning rate after a short warm-up, no weight average (it would mix the
    rounds' students); the teacher's model and data are the teacher's."""
    if tiny:
        distill = DistillConfig(start_steps=8, end_steps=2, round_steps=3)
        train = TrainConfig(batch_size=8, lr=1e-3, warmup_steps=2, ema=0.0, eval_every=3, eval_rows=8, save_every=3,
                            log_every=1, progress=False, max_steps=distill.total_steps)
    else:
        distill = DistillConfig(start_steps=128, end_steps=8, round_steps=125)
        train = TrainConfig(batch_size=32, lr=3e-4, warmup_steps=25, ema=0.0, eval_every=125, eval_rows=128,
                            save_every=125, log_every=10, max_steps=distill.total_steps)
    return train, distill


DISTILL_PRESETS = {
    "distill-tiny": lambda: _distillation(tiny=True),
    "distill-small": lambda: _distillation(tiny=False),
}


def distill_preset(name: str) -> tuple[TrainConfig, DistillConfig]:
    """The train and distill sections of a distillation preset (`pgm distill --preset NAME`)."""
    if name not in DISTILL_PRESETS:
        raise ConfigError(f"unknown distillation preset {name!r}; presets: {', '.join(DISTILL_PRESETS)}")
    return DISTILL_PRESETS[name]()


def vq_preset_for(directory: str) -> str | None:
    """The VQ preset whose default run directory (runs/NAME) is `directory`, if there is one: the
    command to train the VQ tokenizer an image preset names."""
    name = Path(directory).name
    if name in PRESETS and Path(directory) == Path("runs") / name and PRESETS[name]().model.kind == "vq":
        return name
    return None


def image_model_config(name: str):
    """The model of an image preset, or a released image model's shape (IMAGE_SHAPES)."""
    if name in IMAGE_SHAPES:
        return IMAGE_SHAPES[name]()
    config = preset(name).model
    if not (config.kind == "maskgit" or getattr(config, "num_classes", 0)):
        raise ConfigError(f"{name} is not an image model (a class-conditional PGM or MaskGIT); shapes: "
                          f"{', '.join(IMAGE_SHAPES)}")
    return config


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
