"""Fréchet distance, Inception Score, clean-fid resizing, the feature classifier, the Inception wrapper."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from pgm.data.image_sets import fit_size, load_fashion_mnist
from pgm.errors import DataError
from pgm.eval.fid import (ClassifierConfig, FeatureClassifier, FeatureStatistics, InceptionFeatures, clean_resize,
                          fd_classifier, frechet_distance, inception_score, train_classifier)


def correlated_features(count, dim, seed, shift=0.0):
    """Samples of one fixed correlated Gaussian per `dim` (the mixing matrix does not depend on `seed`)."""
    mixing = np.random.default_rng(dim).normal(size=(dim, dim))
    return np.random.default_rng(seed).normal(size=(count, dim)) @ mixing + shift


def test_frechet_distance_of_a_set_with_itself_is_zero():
    statistics = FeatureStatistics.from_features(torch.from_numpy(correlated_features(2000, 16, seed=0)))
    assert statistics.mean.dtype == np.float64 and statistics.covariance.shape == (16, 16)
    assert statistics.count == 2000
    assert abs(frechet_distance(statistics, statistics)) < 1e-6


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = FeatureStatistics(mean_a, np.diag(var_a), 100)
    b = FeatureStatistics(mean_b, np.diag(var_b), 100)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-10)


def test_frechet_distance_grows_with_a_shift_and_is_symmetric():
    a = FeatureStatistics.from_features(correlated_features(3000, 8, seed=1))
    same = FeatureStatistics.from_features(correlated_features(3000, 8, seed=2))
    shifted = FeatureStatistics.from_features(correlated_features(3000, 8, seed=2, shift=5.0))
    assert frechet_distance(a, shifted) == pytest.approx(frechet_distance(shifted, a), rel=1e-8)
    # Two samples of one distribution differ by sampling noise only; a shift of 5 in all 8 dimensions adds 8 * 25.
    assert frechet_distance(a, shifted) > 150 > 20 * frechet_distance(a, same)


def test_frechet_distance_survives_singular_covariances():
    # ReLU features with dead units: zero rows in the covariances make their product exactly singular.
    features = np.maximum(np.random.default_rng(3).normal(size=(200, 6)), 0.0)
    features[:, :2] = 0.0
    statistics = FeatureStatistics.from_features(features)
    assert abs(frechet_distance(statistics, statistics)) < 1e-9
    shifted = FeatureStatistics(statistics.mean + 1.0, statistics.covariance, statistics.count)
    assert frechet_distance(statistics, shifted) == pytest.approx(6.0, rel=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    a = FeatureStatistics(np.zeros(3), np.eye(3), 10)
    b = FeatureStatistics(np.zeros(4), np.eye(4), 10)
    with pytest.raises(ValueError, match="disagree"):
        frechet_distance(a, b)


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(500, 10))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    classes = 7
    logits = torch.full((70 * classes, classes), -50.0)
    logits[torch.arange(len(logits)), torch.arange(len(logits)) % classes] = 50.0
    mean, std = inception_score(logits, splits=10, shuffle_seed=None)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_shuffles_samples_generated_class_by_class():
    classes = 10
    labels = torch.arange(1000) // 100  # class 0 first, then class 1, ...: one class per unshuffled split
    logits = torch.nn.functional.one_hot(labels, classes).double() * 100
    assert inception_score(logits, shuffle_seed=None)[0] == pytest.approx(1.0)
    assert inception_score(logits)[0] > 0.8 * classes


def test_clean_resize_shape_dtype_and_constant_images():
    images = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    resized = clean_resize(images)
    assert resized.shape == (2, 3, 299, 299) and resized.dtype == torch.uint8
    assert bool((resized == 77).all())
    assert clean_resize(np.full((1, 1, 20, 24), 200.0), size=64).unique().tolist() == [200]


def test_clean_resize_matches_pil_float_bicubic_and_truncates_without_clipping():
    rng = np.random.default_rng(0)
    channel = np.zeros((32, 32), dtype=np.float32)
    channel[8:24, 8:24] = 255.0  # a hard edge: bicubic overshoots below 0 and above 255 around it
    channel[2:6, 2:30] = rng.uniform(0, 255, size=(4, 28))
    expected = np.asarray(Image.fromarray(channel, mode="F").resize((299, 299), Image.Resampling.BICUBIC))
    assert expected.min() < -1 and expected.max() > 256
    resized = clean_resize(channel[None, None])[0, 0].numpy()
    inside = (expected >= 0) & (expected < 256)
    np.testing.assert_array_equal(resized[inside], np.trunc(expected[inside]).astype(np.uint8))
    # Outside [0, 256) the reference's unchecked cast wraps around instead of clipping.
    np.testing.assert_array_equal(resized[~inside], np.trunc(expected[~inside]).astype(np.int64) % 256)
    assert (resized[expected <= -1] > 200).all()


def small_fashion_mnist():
    try:
        train_images, train_labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")
    except DataError as error:
        pytest.skip(str(error))
    return (fit_size(train_images[:3000], 32), train_labels[:3000], fit_size(test_images[:1000], 32),
            test_labels[:1000])


def test_classifier_learns_fashion_mnist_and_round_trips(tmp_path):
    train_images, train_labels, test_images, test_labels = small_fashion_mnist()
    config = ClassifierConfig(channels=16, feature_dim=64)
    lines = []
    model, accuracy = train_classifier(train_images, train_labels, test_images, test_labels, epochs=2,
                                       batch_size=32, config=config, log=lines.append)
    assert accuracy >= 0.7, lines
    assert len(lines) == 2 and "test accuracy" in lines[-1]
    assert not model.training

    features, logits = model.features(torch.as_tensor(test_images[:8]).float() / 127.5 - 1)
    assert features.shape == (8, 64) and logits.shape == (8, 10)
    assert torch.equal(model(torch.as_tensor(test_images[:8]).float() / 127.5 - 1), logits)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    assert saved["kind"] == "classifier"
    restored = FeatureClassifier(ClassifierConfig.from_dict(saved))
    restored.load_state_dict(load_file(tmp_path / "model.safetensors"))
    restored.eval()
    batch = torch.as_tensor(test_images[:32]).float() / 127.5 - 1
    with torch.no_grad():
        assert torch.equal(restored.features(batch)[0], model.features(batch)[0])

    # The same images score FD ~0; the classes the classifier tells apart, far more.
    result = fd_classifier(model, test_images[:500], test_images[:500], splits=5)
    assert result["count"] == 500 and abs(result["fd_classifier"]) < 1e-4
    assert 2.0 < result["is_classifier"][0] <= 10.0
    trousers, sandals = test_images[test_labels == 1], test_images[test_labels == 5]
    assert fd_classifier(model, trousers, sandals, splits=2)["fd_classifier"] > 10 * abs(result["fd_classifier"]) + 1


def test_classifier_rejects_images_of_the_wrong_shape():
    model = FeatureClassifier(ClassifierConfig(channels=4, feature_dim=8))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 3, 32, 32))


def test_inception_features_without_torch_fidelity_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity.*weights_path"):
        InceptionFeatures()


class RecordingExtractor(nn.Module):
    """Stands in for torch-fidelity's extractor: records what it is given, returns features of that."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        assert name == "inception-v3-compat" and features_list == ["2048", "logits_unbiased"]
        self.weights_path = feature_extractor_weights_path
        self.anchor = nn.Parameter(torch.zeros(()))
        self.inputs = []

    def forward(self, images):
        self.inputs.append(images)
        pooled = images.float().mean(dim=(1, 2, 3))[:, None]
        return pooled.expand(-1, 2048), pooled.expand(-1, 1008)


def fake_torch_fidelity(monkeypatch):
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = RecordingExtractor
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)


def test_inception_features_preprocess_as_the_protocol_says(monkeypatch, tmp_path):
    fake_torch_fidelity(monkeypatch)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    extractor = InceptionFeatures(str(weights))
    assert extractor.extractor.weights_path == str(weights)
    images = torch.rand(2, 1, 32, 32) * 2.4 - 1.2  # a little outside [-1, 1]: the mapping clips it
    features, logits = extractor(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    given = extractor.extractor.inputs[0]
    assert given.dtype == torch.uint8 and given.shape == (2, 3, 299, 299)
    expected = clean_resize(((images + 1) / 2 * 255).clamp(0, 255))
    assert torch.equal(given, expected.expand(-1, 3, -1, -1))


def test_inception_features_need_an_existing_weights_file(monkeypatch, tmp_path):
    fake_torch_fidelity(monkeypatch)
    with pytest.raises(ValueError, match="not a local file"):
        InceptionFeatures(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------
# FID against a reference, in resumable shards (the ImageNet protocol at a small scale)
# ---------------------------------------------------------------------------------------------

def test_npz_statistics_round_trip_and_a_set_against_itself_is_zero(tmp_path):
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)).double()
    statistics = FeatureStatistics.from_features(features)
    statistics.save_npz(tmp_path / "stats.npz")
    loaded = FeatureStatistics.load_npz(tmp_path / "stats.npz")
    assert loaded.count == 300 and np.array_equal(loaded.mean, statistics.mean)
    assert abs(frechet_distance(loaded, statistics)) < 1e-9
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="not the statistics mu and sigma"):
        FeatureStatistics.load_npz(tmp_path / "other.npz")


class TinyExtractor(nn.Module):
    """Features and logits of images in [-1, 1] that depend on every pixel (for the shard tests)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projection = nn.Linear(3 * 8 * 8, 6)

    def features(self, images):
        out = self.projection(images.flatten(1))
        return out, out[:, :3]


def test_shards_resume_after_a_kill_and_do_not_depend_on_the_processes(tmp_path):
    from pgm.eval.image_metrics import sharded_features

    calls = []

    def make_images(labels, generator, die_at=None):
        calls.append(list(labels))
        if die_at is not None and len(calls) == die_at:
            raise KeyboardInterrupt  # a kill between two shards
        return torch.rand(len(labels), 3, 8, 8, generator=generator) * 2 - 1

    labels = [i % 4 for i in range(22)]
    options = dict(shard_size=8, seed=3, batch_size=4, progress=False)
    whole = sharded_features(make_images, TinyExtractor(), labels, directory=tmp_path / "whole", **options)
    assert whole[0].shape == (22, 6) and len(calls) == 6  # 3 shards of 8, 8, 6 images in batches of 4
    assert calls[0] == calls[2] and not torch.equal(whole[0][:4], whole[0][8:12])  # same labels, other images
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        sharded_features(lambda l, g: make_images(l, g, die_at=3), TinyExtractor(), labels,
                         directory=tmp_path / "killed", **options)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["shard-00000.npz"]  # no half-written shard
    calls.clear()
    resumed = sharded_features(make_images, TinyExtractor(), labels, directory=tmp_path / "killed", **options)
    assert calls == [labels[8:12], labels[12:16], labels[16:20], labels[20:22]]  # shard 0 was not made again
    assert torch.equal(resumed[0], whole[0]) and torch.equal(resumed[1], whole[1])
    # Two processes (torchrun): rank 1 makes shard 1, rank 0 shards 0 and 2 and returns everything.
    assert sharded_features(make_images, TinyExtractor(), labels, directory=tmp_path / "two", rank=1, world_size=2,
                            **options) is None
    assert [p.name for p in sorted((tmp_path / "two").iterdir())] == ["shard-00001.npz"]
    split = sharded_features(make_images, TinyExtractor(), labels, directory=tmp_path / "two", rank=0, world_size=2,
                             wait_seconds=0.01, **options)
    assert torch.equal(split[0], whole[0])


def test_fid_against_a_reference_folder_samples_its_labels(image_runs, tmp_path):
    import pgm
    from pgm.data.image_sets import load_fashion_mnist
    from pgm.eval.fid import train_classifier

    images, labels = load_fashion_mnist("test")
    classifier, _ = train_classifier(fit_size(images[:256], 32), labels[:256], fit_size(images[256:320], 32),
                                     labels[256:320], epochs=1, log=lambda *a: None)
    classifier.save_pretrained(tmp_path / "classifier")
    for label in range(10):  # sorted folder names are the class order
        (tmp_path / "reference" / f"class-{label}").mkdir(parents=True)
        for i in np.nonzero(labels == label)[0][:2]:
            Image.fromarray(images[i, 0]).save(tmp_path / "reference" / f"class-{label}" / f"{i}.png")
    import shutil

    shutil.copytree(image_runs / "pgm", tmp_path / "run")  # the shards go beside the model
    pipe = pgm.load(tmp_path / "run")
    options = dict(classifier=tmp_path / "classifier", num_samples=10, steps=4, shard_size=4, progress=False)
    scores = pipe.fid(tmp_path / "reference", **options)
    assert scores["num_samples"] == 10 and scores["reference_count"] == 20 and scores["fid"] > 0
    assert Path(scores["shards"]).parent == tmp_path / "run" / "fid-shards"
    shards = sorted(p.name for p in Path(scores["shards"]).iterdir())
    assert shards == ["settings.json", "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert len(list((tmp_path / "run" / "fid-shards").glob("reference-*.npz"))) == 1  # one per reference
    sampled = np.concatenate([np.load(Path(scores["shards"]) / name)["labels"] for name in shards[1:]])
    assert sampled.tolist() == list(range(10))  # the reference's labels, taken evenly over it: one per class
    assert pipe.fid(tmp_path / "reference", **options)["fid"] == scores["fid"]  # read back from the shards
    cached = next((tmp_path / "run" / "fid-shards").glob("reference-*.npz"))
    FeatureStatistics.load_npz(cached).save_npz(tmp_path / "reference.npz")
    from_npz = pipe.fid(tmp_path / "reference.npz", **options)
    assert from_npz["shards"] != scores["shards"] and from_npz["fid"] > 0  # other labels: every class in turn
    with pytest.raises(ValueError, match="holds the shards of another evaluation .* differs in guidance"):
        pipe.fid(tmp_path / "reference", shards=scores["shards"], **{**options, "guidance": 2.0})
    (tmp_path / "reference" / "extra").mkdir()  # an 11th class folder: the labels would not be the model's
    with pytest.raises(ValueError, match="has 11 class folders but the model 10 classes"):
        pipe.fid(tmp_path / "reference", **options)


def test_pgm_eval_reference_prints_the_fid_and_where_the_shards_are(image_runs, tmp_path, pgm_main):
    from pgm.models import build_model
    from pgm.models.classifier import ClassifierConfig

    build_model(ClassifierConfig()).save_pretrained(tmp_path / "classifier")  # any features will do here
    images, _ = load_fashion_mnist("test")
    (tmp_path / "flat").mkdir()
    for i in range(6):
        Image.fromarray(images[i, 0]).save(tmp_path / "flat" / f"{i}.png")
    code, out, err = pgm_main("eval", image_runs / "maskgit", "--reference", tmp_path / "flat", "--classifier",
                              tmp_path / "classifier", "--num-samples", "6", "--steps", "4", "--shard-size", "3",
                              "--redraw", "--guidance-schedule", "constant", "--passes", "0", "--shards",
                              tmp_path / "shards")
    assert code == 0, err
    assert "FD (classifier features)" in out and "6 samples (4 steps, halton, guidance 0 (constant)" in out
    assert ", redraw)" in out and "shards in" in out
    code, _, err = pgm_main("eval", image_runs / "maskgit", "--shard-size", "3", "--fid")
    assert code == 2 and "--shards and --shard-size apply to an evaluation against --reference" in err
