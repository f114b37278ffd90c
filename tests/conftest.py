import pytest
import torch

from pgm.models import MaskedDiffusionConfig, MaskedDiffusionTransformer, PartitionConfig, PartitionTransformer


def redraw_zero_initialised(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """adaLN and output layers start at zero, which would make equivalence tests trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or "output_layer.linear" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def tiny_pgm(**overrides) -> PartitionTransformer:
    values = dict(vocab_size=41, length=20, hidden_size=32, num_heads=4, encoder_blocks=2, decoder_blocks=2,
                  cond_dim=16, dropout=0.0)
    values.update(overrides)
    torch.manual_seed(0)
    return redraw_zero_initialised(PartitionTransformer(PartitionConfig(**values))).eval()


def tiny_mdlm(**overrides) -> MaskedDiffusionTransformer:
    values = dict(vocab_size=41, length=20, hidden_size=32, num_heads=4, blocks=3, cond_dim=16, dropout=0.0)
    values.update(overrides)
    torch.manual_seed(0)
    return redraw_zero_initialised(MaskedDiffusionTransformer(MaskedDiffusionConfig(**values))).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)


def tiny_config(**train_overrides):
    """The text-tiny preset (20 steps of a 0.13M PGM on 40 documents of the built-in corpus)."""
    from pgm.presets import preset

    overrides = [f"{k}={v}" for k, v in {"log_every": 1, **train_overrides}.items()]
    return preset("text-tiny").with_overrides(overrides)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A text-tiny run, trained once for the whole session; tests must not change it."""
    from pgm.train import train

    run_dir = tmp_path_factory.mktemp("text") / "tiny"
    train(tiny_config(), run_dir, log=lambda *a: None)
    return run_dir


@pytest.fixture(scope="session")
def image_runs(tmp_path_factory):
    """vq/ (vq-tiny), and pgm/ and maskgit/ (image-pgm-tiny, maskgit-tiny) on its codes, trained
    through the command line; skipped without Fashion-MNIST."""
    import subprocess
    import sys

    from pgm.data.image_sets import load_fashion_mnist
    from pgm.errors import DataError

    try:
        load_fashion_mnist("test")
    except DataError as error:
        pytest.skip(str(error))
    root = tmp_path_factory.mktemp("images")
    vq = root / "vq"
    for name, out, extra in (("vq-tiny", vq, []), ("image-pgm-tiny", root / "pgm", [f"data.tokenizer=vq:{vq}"]),
                             ("maskgit-tiny", root / "maskgit", [f"data.tokenizer=vq:{vq}"])):
        result = subprocess.run([sys.executable, "-m", "pgm", "train", "--preset", name, "--out", str(out), *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def pgm_main(monkeypatch, capsys):
    """Run `pgm ARGS` in this process; (exit code, stdout, stderr)."""
    from pgm import cli

    monkeypatch.setattr(cli, "keep_freed_memory", lambda: False)  # leave this process's malloc alone
    monkeypatch.delenv("PGM_DEBUG", raising=False)

    def run(*args):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exited:  # argparse's refusals
            code = exited.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def without_package(monkeypatch):
    """`without_package("huggingface_hub")`: from then on in the test, importing it (or its
    submodules) fails as it does where the package is not installed."""
    import builtins

    real_import = builtins.__import__

    def block(prefix: str) -> None:
        def importing(name, *args, **kwargs):
            if name == prefix or name.startswith(prefix + "."):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", importing)

    return block
