"""The figures of the report beyond FID, from the features and logits of every sample (in
sample order) and of the reference images, in float64 on the main rank:

- IS over 10 splits (torch-fidelity's and torchmetrics' definition, so it compares with
  published numbers), with its spread;
- KID, the unbiased polynomial-kernel MMD^2 over random subsets (Binkowski et al. 2018);
- improved precision and recall, k-NN radii with k = 3 (Kynkaanniemi et al. 2019);
- FID_inf: FID at several sample counts, fitted linearly in 1/N, extrapolated to N = inf
  (Chong and Forsyth 2020).

Every random draw comes from a fixed seed, so the figures are the same on every run and
every worker count.
"""

from __future__ import annotations

import numpy as np

from .stats import frechet_distance

IS_SPLITS = 10
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
PR_NEIGHBOURS = 3


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and standard deviation over splits of exp(E_x KL(p(y|x) || p(y))). The splits are
    consecutive chunks of ceil(N / splits) samples, as torch.chunk cuts them."""
    z = logits.astype(np.float64)
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p, size = np.exp(log_p), -(-len(z) // splits)
    scores = []
    for start in range(0, len(z), size):
        chunk, log_chunk = p[start:start + size], log_p[start:start + size]
        marginal = chunk.mean(axis=0, keepdims=True)
        scores.append(float(np.exp((chunk * (log_chunk - np.log(marginal))).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """Mean and (population) standard deviation over ``subsets`` draws of the unbiased MMD^2
    with the kernel (x.y / d + 1)^3; subsets of min(subset_size, N_real, N_fake) samples."""
    rng, m = np.random.default_rng(seed), min(subset_size, len(real), len(fake))
    scores = [_poly_mmd(real[rng.permutation(len(real))[:m]], fake[rng.permutation(len(fake))[:m]])
              for _ in range(subsets)]
    return float(np.mean(scores)), float(np.std(scores))


def _poly_mmd(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    m, d = len(x), x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off_diagonal = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(off_diagonal / (m * (m - 1)) - 2 * k_xy.sum() / m ** 2)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Precision: the share of samples inside the real manifold (some real point's k-NN
    ball); recall: the share of real points inside the samples' manifold."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    real_radii, fake_radii = _kth_neighbour_distance(real, k), _kth_neighbour_distance(fake, k)
    return _inside(fake, real, real_radii), _inside(real, fake, fake_radii)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def _kth_neighbour_distance(points: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point (its ball's radius)."""
    k = min(k, len(points) - 1)
    radii = []
    for start in range(0, len(points), block):
        d = _squared_distances(points[start:start + block], points)
        radii.append(np.partition(d, k, axis=1)[:, k])  # column 0 is the point itself
    return np.concatenate(radii)


def _inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int = 1024) -> float:
    hits = [(_squared_distances(queries[s:s + block], centres) <= radii[None, :]).any(axis=1)
            for s in range(0, len(queries), block)]
    return float(np.concatenate(hits).mean())


def fid_infinity(fake: np.ndarray, ref_mu: np.ndarray, ref_cov: np.ndarray, points: int = 5,
                 seed: int = 0) -> dict:
    """FID of nested random subsets of the samples (N from N/5 to N), a least-squares line
    FID = FID_inf + slope / N, and its intercept: the FID an infinite sample would get."""
    order = np.random.default_rng(seed).permutation(len(fake))
    counts = sorted({int(n) for n in np.linspace(max(2, len(fake) // 5), len(fake), points)})
    fids = []
    for n in counts:
        subset = fake[order[:n]].astype(np.float64)
        fids.append(frechet_distance(subset.mean(0), np.cov(subset, rowvar=False), ref_mu, ref_cov))
    slope, intercept = np.polyfit(1.0 / np.array(counts, dtype=np.float64), np.array(fids), 1) \
        if len(counts) > 1 else (0.0, fids[0])
    return {"fid_inf": float(intercept), "fid_inf_slope": float(slope),
            "fid_at_n": {str(n): f for n, f in zip(counts, fids)}}
