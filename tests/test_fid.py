"""Fréchet distance, Inception Score, clean-fid resizing, the feature classifier, the Inception wrapper."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from pgm.data.corpus import DataError
from pgm.data.images import fit_size, load_fashion_mnist
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
