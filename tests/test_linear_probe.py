"""The linear probe (pipeline/evaluate/linear_probe.py) on features whose answer is known: a linearly
separable synthetic set, and Fashion-MNIST's raw pixels against scikit-learn's logistic regression
under the same protocol (regularisation picked on the same held-out split, refit on all of it).
And the feature cache: one extraction per (backbone, shards, preprocessing)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ssl_foundry.data_prep.fashion_mnist import SOURCE_DIR, read_split, split_files
from ssl_foundry.pipeline.config import LinearProbeConfig
from ssl_foundry.pipeline.evaluate.knn import cached_features
from ssl_foundry.pipeline.evaluate.linear_probe import linear_probe, sweep_split

FMNIST_TRAIN, FMNIST_TEST = 5000, 2000  # a slice: the whole comparison takes seconds


@pytest.fixture(autouse=True)
def one_thread():
    """One torch and one BLAS thread: the machine's cores are shared with other tests, and an
    oversubscribed OpenBLAS made scikit-learn's solver ~15x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def separable_set(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points labelled by the argmax of a fixed random linear map, minus those within a margin of a
    decision boundary: a linear classifier with 100 % accuracy exists. Offset and scaled unevenly
    per dimension, as backbone features are."""
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(classes, dim, generator=g)
    scale, offset = torch.rand(dim, generator=g) * 10 + 0.1, torch.randn(dim, generator=g) * 5
    x = torch.randn(4 * n, dim, generator=torch.Generator().manual_seed(seed))
    scores = (x @ true_w.T).sort(dim=1).values
    kept = x[scores[:, -1] - scores[:, -2] > 0.5][:n]
    assert len(kept) == n
    return kept * scale + offset, (kept @ true_w.T).argmax(dim=1)


def test_linearly_separable_features_are_classified_perfectly():
    train_x, train_y = separable_set(2000, 32, 5, seed=1)
    test_x, test_y = separable_set(1000, 32, 5, seed=2)
    cfg = LinearProbeConfig(epochs=30, lrs=[0.01, 0.1, 1.0])
    result = linear_probe(train_x, train_y, test_x, test_y, cfg)
    assert set(result.val_top1) == {0.01, 0.1, 1.0}
    assert result.val_top1[result.best_lr] == max(result.val_top1.values())
    assert result.test_top1 >= 0.99
    # The head takes raw features (the standardisation is folded into it) and is BN-free.
    assert isinstance(result.head, torch.nn.Linear) and result.head.in_features == 32
    assert float((result.head(test_x).argmax(1) == test_y).float().mean()) == result.test_top1


def test_chance_level_when_labels_do_not_depend_on_features():
    train_x, _ = separable_set(1000, 16, 4, seed=3)
    test_x, _ = separable_set(1000, 16, 4, seed=4)
    g = torch.Generator().manual_seed(5)
    train_y, test_y = torch.randint(0, 4, (1000,), generator=g), torch.randint(0, 4, (1000,), generator=g)
    result = linear_probe(train_x, train_y, test_x, test_y, LinearProbeConfig(epochs=10, lrs=[0.1]))
    assert abs(result.test_top1 - 0.25) < 0.06  # 4.5 sigma of a binomial(1000, 0.25) proportion


def fmnist_pixels(prefix: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of a split as [0, 1] pixel vectors, straight from the idx files."""
    pixels, labels = read_split(*split_files(SOURCE_DIR, prefix))
    x = np.frombuffer(pixels, np.uint8)[: count * 784].reshape(count, 784) / 255.0
    return x, np.frombuffer(labels, np.uint8)[:count].astype(np.int64)


def sklearn_logistic_regression(train_x, train_y, test_x, test_y, val_index, fit_index) -> float:
    """The same protocol with scikit-learn's solver: standardised inputs, L2 strength C picked on the
    held-out split, refit on the whole train set, test accuracy."""
    def fit(x, y, c):
        scaler = StandardScaler().fit(x)
        return scaler, LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x), y)

    def score(model, x, y):
        scaler, classifier = model
        return classifier.score(scaler.transform(x), y)

    val_scores = {c: score(fit(train_x[fit_index], train_y[fit_index], c), train_x[val_index], train_y[val_index])
                  for c in (0.01, 0.1, 1.0)}
    best_c = max(val_scores, key=val_scores.get)
    return score(fit(train_x, train_y, best_c), test_x, test_y)


def test_raw_fashion_mnist_pixels_match_scikit_learn_logistic_regression_within_1_point():
    train_x, train_y = fmnist_pixels("train", FMNIST_TRAIN)
    test_x, test_y = fmnist_pixels("t10k", FMNIST_TEST)
    cfg = LinearProbeConfig()  # the defaults `foundry eval linear` uses
    ours = linear_probe(torch.from_numpy(train_x).float(), torch.from_numpy(train_y),
                        torch.from_numpy(test_x).float(), torch.from_numpy(test_y), cfg)
    # The probe's own held-out split (seeded by cfg.seed), reproduced for scikit-learn.
    order = torch.randperm(FMNIST_TRAIN, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    num_val = round(cfg.val_fraction * FMNIST_TRAIN)
    reference = sklearn_logistic_regression(train_x, train_y, test_x, test_y, order[:num_val], order[num_val:])
    assert 0.80 < reference < 0.88  # what a linear model gets on 5,000 raw Fashion-MNIST images
    assert abs(ours.test_top1 - reference) <= 0.01, (ours, reference)


class CountingFlatten(torch.nn.Flatten):
    """Raw pixels as features, counting the images it is shown."""

    images = 0

    def forward(self, x):
        CountingFlatten.images += len(x)
        return super().forward(x)


def test_features_are_extracted_once_per_backbone_shards_and_preprocessing(fmnist, tmp_path):
    args = dict(image_size=8, mean=[0.5] * 3, std=[0.5] * 3, batch_size=64, num_workers=0)
    backbone, folder, cache = CountingFlatten(), str(fmnist / "test"), tmp_path / "cache"
    CountingFlatten.images = 0
    features, labels = cached_features(backbone, folder, cache, "digest-a", **args)
    assert CountingFlatten.images == 128 and features.shape == (128, 3 * 8 * 8) and len(labels) == 128
    again, again_labels = cached_features(backbone, folder, cache, "digest-a", **args)
    assert CountingFlatten.images == 128  # from the cache
    assert torch.equal(again, features) and torch.equal(again_labels, labels)
    cached_features(backbone, folder, cache, "digest-b", **args)  # other weights
    assert CountingFlatten.images == 256
    resized = cached_features(backbone, folder, cache, "digest-a", **{**args, "image_size": 4})[0]
    assert CountingFlatten.images == 384 and resized.shape == (128, 3 * 4 * 4)
    assert len(list(cache.iterdir())) == 3  # and no temp files left behind


def test_sweep_split_is_seeded_and_grouped_splits_never_share_a_group():
    cfg = LinearProbeConfig(val_fraction=0.25, seed=3)
    val, fit = sweep_split(40, cfg)
    assert len(val) == 10 and sorted(torch.cat([val, fit]).tolist()) == list(range(40))
    assert torch.equal(val, sweep_split(40, cfg)[0])  # same seed, same split
    assert not torch.equal(val, sweep_split(40, dataclasses.replace(cfg, seed=4))[0])

    groups = torch.arange(8).repeat_interleave(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])).repeat(2)
    val, fit = sweep_split(len(groups), cfg, groups)
    assert sorted(torch.cat([val, fit]).tolist()) == list(range(len(groups)))
    assert set(groups[val].tolist()).isdisjoint(groups[fit].tolist())
    assert len(set(groups[val].tolist())) == 2  # a quarter of 8 groups
    # Two groups: one for the sweep, one to fit on, whatever the fraction.
    two = torch.tensor([5, 5, 9, 9, 9])
    val, fit = sweep_split(5, dataclasses.replace(cfg, val_fraction=0.9), two)
    assert len(set(two[val].tolist())) == 1 and len(set(two[fit].tolist())) == 1
    with pytest.raises(ValueError, match="2 groups or more"):
        sweep_split(3, cfg, torch.zeros(3, dtype=torch.long))
