"""Feature extractors for FID / IS / class accuracy, from local files or S3 only.

``inception``: torch-fidelity's FID Inception-v3 (the standard
``pt_inception-2015-12-05`` weights), 2048-d pool features and its 1008 logits.
``classifier``: the framework's domain classifier (an exported ``DomainClassifier``),
its pooled features and its class logits, which also score class accuracy.
Each has an ``id`` naming the network and a hash of its weights, so cached reference
statistics are tied to exactly the extractor that made them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..config import ConfigError, EvalConfig
from ..data import storage


class Extractor(Protocol):
    """uint8 images [N, 3, H, W] -> (features [N, D] float64, logits [N, K] float64)."""

    id: str
    dim: int
    classes: int
    judges_labels: bool  # logits are the dataset's classes: class accuracy is meaningful

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]: ...


class InceptionExtractor:
    dim, classes, judges_labels = 2048, 1008, False

    def __init__(self, weights: Path, where: torch.device):
        from ..extras import require

        fidelity = require("torch_fidelity.feature_extractor_inceptionv3", "eval", "eval.features=inception")
        FeatureExtractorInceptionV3 = fidelity.FeatureExtractorInceptionV3
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights)).eval().to(where)
        self.where = where
        self.id = f"inception-v3-compat-{_file_hash(weights)}"

    @torch.no_grad()
    def __call__(self, images):
        feats, logits = self.net(images.to(self.where, torch.uint8))
        return _host(feats), _host(logits)


class ClassifierExtractor:
    judges_labels = True

    def __init__(self, directory: Path, where: torch.device):
        from ..core.classifier import DomainClassifier

        self.net = DomainClassifier.from_pretrained(str(directory)).eval().float().to(where)
        self.where = where
        self.resolution = self.net.config.resolution
        self.dim, self.classes = self.net.head.in_features, self.net.head.out_features
        self.id = f"classifier-{_file_hash(directory / 'diffusion_pytorch_model.safetensors')}"

    @torch.no_grad()
    def __call__(self, images):
        x = images.to(self.where).float() / 127.5 - 1
        if x.shape[-1] != self.resolution:
            x = torch.nn.functional.interpolate(x, size=self.resolution, mode="bilinear", antialias=True)
        feats = self.net.features(x)
        return _host(feats), _host(self.net.head(feats))


def _host(t: torch.Tensor) -> np.ndarray:
    """float64 numpy on the host (the sums that FID reduces are float64)."""
    return t.detach().double().cpu().numpy()


def build_extractor(e: EvalConfig, where: torch.device = torch.device("cpu")) -> Extractor:
    """The feature network the ``eval`` section names, on ``where``."""
    check_extractor(e)
    if e.features == "inception":
        return InceptionExtractor(_local_file(e.inception_weights, "eval.inception_weights"), where)
    return ClassifierExtractor(Path(e.classifier), where)


def check_extractor(e: EvalConfig) -> None:
    """The feature network the ``eval`` section names is there and is what it is named as
    (checked before any rank starts; an s3:// weights URL is checked when it is fetched)."""
    if e.features == "inception":
        if not e.inception_weights:
            raise ConfigError("eval.features=inception needs eval.inception_weights: a path or s3:// URL of "
                              "the FID Inception weights (pt_inception-2015-12-05-6726825d.pth); nothing is "
                              "downloaded at run time. Or use eval.features=classifier")
        if not storage.parse(e.inception_weights).is_s3 and not Path(e.inception_weights).is_file():
            raise ConfigError(f"eval.inception_weights={e.inception_weights} does not exist; point it at the "
                              f"weights file")
        return
    if not e.classifier:
        raise ConfigError("eval.features=classifier needs eval.classifier: the directory `dist-diffusion export` "
                          "wrote for a run with train.target=classifier")
    config = Path(e.classifier) / "config.json"
    kind = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    if kind != "DomainClassifier":
        what = f"an exported {kind}, not a classifier" if kind else "not an exported classifier (no config.json)"
        raise ConfigError(f"eval.classifier={e.classifier} is {what}; export a run with "
                          f"train.target=classifier (`dist-diffusion export --run-dir RUN --out DIR`)")


def _local_file(url: str, key: str) -> Path:
    """A path as is; an s3:// URL downloaded once into a cache named by the URL."""
    loc = storage.parse(url)
    if not loc.is_s3:
        if not Path(url).is_file():
            raise ConfigError(f"{key}={url} does not exist; point it at the weights file")
        return Path(url)
    cache = Path(tempfile.gettempdir()) / "dist_diffusion_weights" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if cache.is_file():
        return cache
    if not storage.exists(loc):
        raise ConfigError(f"{key}={url} does not exist in S3; upload the weights file there")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # One process of the machine downloads, the others wait on the lock and find the file
    # (all 8 local ranks writing one .part file and renaming it broke or truncated it)
    with open(cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.is_file():
            tmp = cache.with_suffix(f".part-{os.getpid()}")
            tmp.write_bytes(storage.read_bytes(loc))
            tmp.replace(cache)  # whole or absent: a crash mid-download leaves no cache
    return cache


def _file_hash(path: Path) -> str:
    return storage.file_sha256(path)[:12]
