"""The report's figures from features and logits: IS over 10 splits, KID, FID against
torchmetrics (the dev-extra oracle) on identical inputs; precision/recall and FID_inf on
cases worked by hand."""

import numpy as np
import pytest
import torch

from dist_diffusion.evaluate.metrics import (fid_infinity, inception_score, kernel_inception_distance,
                                             precision_recall)
from dist_diffusion.evaluate.stats import frechet_distance


def test_inception_score_over_10_splits_equals_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    logits = np.random.default_rng(0).normal(0, 3, size=(95, 7))
    metric = InceptionScore(feature=torch.nn.Identity(), splits=10)
    metric.update(torch.from_numpy(logits))
    torch.manual_seed(5)
    order = torch.randperm(95).numpy()  # torchmetrics shuffles before it splits: the same draw
    torch.manual_seed(5)
    want_mean, want_std = (v.item() for v in metric.compute())
    got_mean, got_std = inception_score(logits[order], splits=10)
    assert got_mean == pytest.approx(want_mean, rel=1e-9) and got_std == pytest.approx(want_std, rel=1e-9)
    assert inception_score(logits, splits=1)[0] != pytest.approx(got_mean, rel=1e-3)  # splits matter


def test_kid_equals_torchmetrics_on_whole_sets():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 16)), rng.normal(0.4, 1.0, size=(30, 16))
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=30)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    want = metric.compute()[0].item()
    got, spread = kernel_inception_distance(real, fake, subsets=1, subset_size=30)
    assert got == pytest.approx(want, rel=1e-9) and spread == 0.0 and got > 0
    same, _ = kernel_inception_distance(real, rng.normal(size=(30, 16)), subsets=3, subset_size=30)
    assert abs(same) < got / 3  # another draw of the same distribution: near 0 (unbiased, either sign)


def test_fid_equals_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 10)), rng.normal(0.2, 1.3, size=(150, 10)) @ rng.normal(size=(10, 10))
    mu1, c1, mu2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    want = _compute_fid(*(torch.from_numpy(v) for v in (mu1, c1, mu2, c2))).item()
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-6)


def test_precision_recall_by_hand():
    # k = 1. Real radii (squared): 1, 1, 1, 64; the samples' radii: 20.25, 20.25, 225.
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [5.0], [20.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3) and recall == 1.0  # 20 lies outside every real ball


def test_fid_inf_removes_the_small_sample_bias():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(4000, 8))
    fake = rng.normal(size=(500, 8))  # the same distribution: FID_inf should be near 0
    fit = fid_infinity(fake, ref.mean(0), np.cov(ref, rowvar=False))
    counts = sorted(map(int, fit["fid_at_n"]))
    assert counts[0] == 100 and counts[-1] == 500 and len(counts) == 5
    assert fit["fid_at_n"]["100"] > fit["fid_at_n"]["500"] > abs(fit["fid_inf"])  # bias falls as 1/N
    assert fit["fid_inf_slope"] > 0
