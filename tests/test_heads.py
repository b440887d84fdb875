"""The head on its own: the shape of its output for each pooling, the layers it is made of, and the fixed
standardisation it learns from the training features and keeps with its weights."""

from __future__ import annotations

import pytest
import torch

from headstart import Head, HeadConfig
from headstart.errors import ConfigError


def test_each_pooling_gives_one_score_per_class():
    fmap = torch.randn(5, 8, 3, 3)
    flat = Head(HeadConfig(pool="flatten"), (8, 3, 3), num_classes=4).eval()
    avg = Head(HeadConfig(pool="avg"), (8, 3, 3), num_classes=4).eval()
    assert (flat.in_features, avg.in_features) == (8 * 3 * 3, 8)
    assert flat(fmap).shape == avg(fmap).shape == (5, 4)
    assert flat.layers.predictions.weight.shape == (4, 72) and avg.layers.predictions.weight.shape == (4, 8)


def test_hidden_layers_and_dropout_are_the_named_dense_stack():
    head = Head(HeadConfig(pool="flatten", hidden=(16, 8), dropout=0.5), (4, 2, 2), num_classes=3)
    assert [n for n, _ in head.layers.named_children()] == [
        "dropout_0", "dense_0", "relu_0", "dropout_1", "dense_1", "relu_1", "dropout", "predictions"]
    assert [m.out_features for m in head.layers if isinstance(m, torch.nn.Linear)] == [16, 8, 3]
    x = torch.randn(6, 4, 2, 2)
    head.train()
    assert not torch.equal(head(x), head(x))  # dropout draws while training
    head.eval()
    assert torch.equal(head(x), head(x))  # and is off when predicting


def test_an_averaging_head_reads_maps_or_their_averages_alike():
    """The feature cache may hold each map's average instead of the map (``feature_pool``): same scores."""
    head = Head(HeadConfig(pool="avg", hidden=(5,)), (8, 3, 3), num_classes=3).eval()
    fmap = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(head(fmap), head(fmap.mean(dim=(2, 3))))
    assert head.feature_pool == "avg"
    assert Head(HeadConfig(pool="flatten"), (8, 3, 3), num_classes=3).feature_pool is None


def test_the_overall_activation_level_does_not_change_the_scores():
    """Each image's vector is scaled to unit length: a brighter or higher-contrast copy scores the same."""
    head = Head(HeadConfig(pool="flatten"), (8, 3, 3), num_classes=3).eval()
    fmap = torch.rand(4, 8, 3, 3)
    torch.testing.assert_close(head(fmap), head(fmap * 7.5))


def test_the_standardisation_is_fitted_on_training_features_and_kept_with_the_weights():
    torch.manual_seed(0)
    head = Head(HeadConfig(pool="avg"), (6,), num_classes=2)
    spread = torch.tensor([1.0, 10.0, 100.0, 0.1, 1.0, 1.0])
    pooled = head.pool(torch.randn(500, 6) * spread + 3.0)
    head.fit_standardizer(pooled)
    z = head.standardize(pooled)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6), atol=1e-4, rtol=0)
    again = Head(HeadConfig(pool="avg"), (6,), num_classes=2)
    again.load_state_dict(head.state_dict())  # shift and scale travel in the state dict, as the run saves it
    torch.testing.assert_close(again.standardize(pooled), z)
    # far outside the training range, a feature is clipped rather than blowing up the scores
    assert head.standardize(pooled + 100.0).abs().max() <= 10.0


def test_a_feature_that_never_varied_stays_zero():
    head = Head(HeadConfig(pool="avg"), (3,), num_classes=2)
    x = torch.randn(50, 3)
    x[:, 1] = 0.0  # a dead unit
    pooled = head.pool(x)
    head.fit_standardizer(pooled)
    z = head.standardize(pooled)
    assert torch.isfinite(z).all() and torch.equal(z[:, 1], torch.zeros(50))


def test_a_head_needs_two_classes_and_a_chosen_pooling():
    with pytest.raises(ConfigError, match="at least 2 classes, got 1"):
        Head(HeadConfig(pool="avg"), (8,), num_classes=1)
    with pytest.raises(ConfigError, match="pooling is not chosen"):
        Head(HeadConfig(), (8,), num_classes=2)
    with pytest.raises(ConfigError, match="'max' is not one of"):
        HeadConfig(pool="max")
    assert HeadConfig().resolved("flatten").pool == "flatten"
