"""Feature statistics as running sums, so ranks reduce sums and never gather images.

Everything is float64: the Fréchet distance subtracts nearly equal traces, and sums
reduced in another order (1 vs 2 processes) then agree to ~1e-12 relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureSums:
    """Sufficient statistics of a set of samples for FID, IS and class accuracy."""

    count: int
    feat_sum: np.ndarray      # [D]
    feat_outer: np.ndarray    # [D, D]: sum of f f^T
    prob_sum: np.ndarray      # [K]: sum of softmax(logits), for the IS marginal
    plogp_sum: float          # sum over samples of sum_k p log p
    correct: int              # argmax(logits) == asked label

    @classmethod
    def empty(cls, dim: int, classes: int) -> "FeatureSums":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)), np.zeros(classes), 0.0, 0)

    def add(self, features: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None) -> None:
        f = features.astype(np.float64)
        self.count += len(f)
        self.feat_sum += f.sum(axis=0)
        self.feat_outer += f.T @ f
        p = _softmax(logits.astype(np.float64))
        self.prob_sum += p.sum(axis=0)
        self.plogp_sum += float((p * np.log(np.clip(p, 1e-30, None))).sum())
        if labels is not None:
            self.correct += int((logits.argmax(axis=1) == labels).sum())

    def to_vector(self) -> np.ndarray:
        """One flat float64 vector, for a single all-reduce."""
        return np.concatenate([[self.count, self.plogp_sum, self.correct], self.feat_sum,
                               self.feat_outer.ravel(), self.prob_sum])

    @classmethod
    def from_vector(cls, vec: np.ndarray, dim: int, classes: int) -> "FeatureSums":
        at = 3 + dim
        return cls(int(round(vec[0])), vec[3:at], vec[at:at + dim * dim].reshape(dim, dim),
                   vec[at + dim * dim:], float(vec[1]), int(round(vec[2])))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.feat_sum / self.count
        cov = (self.feat_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, cov

    def inception_score(self) -> float:
        """exp(E_x KL(p(y|x) || p(y))) over all samples (one split)."""
        marginal = self.prob_sum / self.count
        kl = self.plogp_sum / self.count - float((marginal * np.log(np.clip(marginal, 1e-30, None))).sum())
        return float(np.exp(kl))

    def accuracy(self) -> float:
        return self.correct / self.count


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2).

    tr((C1 C2)^1/2) is the sum of square roots of the eigenvalues of C1^1/2 C2 C1^1/2, a
    symmetric PSD matrix: eigh is stable there, where sqrtm of the non-symmetric product
    can return complex noise."""
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ cov2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
