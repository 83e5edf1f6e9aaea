"""The distributed sampling job: DDIM/DDPM/DPM-Solver + CFG fanned out over ranks,
images written as shards, features reduced into FID / IS / class accuracy.

Sample i has label i mod num_classes and draws all its noise from (sample.seed, i);
shard k holds samples [k*S, (k+1)*S) and is generated in batches that start at k*S,
so images depend on neither the number of processes nor the order shards run in.
Shard k goes to rank k mod world. Its features are stored beside it (written last, so
they mark it complete): a restarted job loads them instead of sampling again, and its
metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..config import (Config, ConfigError, DataConfig, DiffusionConfig, EvalConfig, SampleConfig, VAEConfig,
                      parse_sampler_entry, replaced)
from ..config.registry import SAMPLERS
from ..config.shapes import unet_input_shape
from ..data import storage
from ..logs import get_logger
from ..data.shards import upload_tar
from ..core.generate import decode_on_its_device, generate
from ..core.processes import make_process
from ..imaging import save_grid, to_uint8
from ..runtime.distributed import all_reduce_sum, describe, device, init_process_group, shutdown
from ..runtime.engine import apply_device_numerics
from ..runtime.preemption import NO_STOP, PREEMPTED, StopRequests, stop_exception
from .adm_npz import write_adm_npz
from .features import Extractor, build_extractor, check_extractor
from .metrics import IS_SPLITS, fid_infinity, inception_score, kernel_inception_distance, precision_recall
from .reference import floor_images, real_floor, reference_features, reference_stats
from .report import result_row, write_report
from .stats import FeatureSums, frechet_distance

LOG = get_logger("eval")


@dataclass(frozen=True)
class Point:
    """One evaluated setting of a sweep. Points sampled with ``sample.sampler`` are named
    cfg<s>_steps<n>; a point of another sampler (eval.samplers) carries its name first."""

    guidance_scale: float
    steps: int
    sampler: str
    default_sampler: str

    @property
    def name(self) -> str:
        prefix = "" if self.sampler == self.default_sampler else f"{self.sampler}_"
        return f"{prefix}cfg{self.guidance_scale:g}_steps{self.steps}"

    def applied_to(self, sample: SampleConfig) -> SampleConfig:
        """``sample`` with this point's sampler, steps and scale: what generate() reads."""
        return replaced(sample, guidance_scale=self.guidance_scale, steps=self.steps, sampler=self.sampler)


@dataclass(frozen=True)
class EvalJob:
    """What the sampling job reads of the config: its own section, the sampler's and the
    forward process's, and the classes and side of what it samples."""

    eval: EvalConfig
    sample: SampleConfig
    diffusion: DiffusionConfig
    num_classes: int
    resolution: int


def sweep(sample: SampleConfig, ev: EvalConfig, num_train_timesteps: int) -> list[Point]:
    """eval.samplers x steps x CFG scales, in that order. A sampler given as NAME:STEPS takes
    its own step count; a sampler that walks all T steps whatever the count (ddpm) is one point
    per scale."""
    scales = ev.guidance_scales or [sample.guidance_scale]
    points = []
    for sampler, pinned in map(parse_sampler_entry, ev.samplers or [sample.sampler]):
        counts = [pinned] if pinned else ev.steps or [sample.steps]
        if SAMPLERS[sampler].all_steps:
            counts = [num_train_timesteps]
        points += [Point(float(s), int(n), sampler, sample.sampler) for n in dict.fromkeys(counts) for s in scales]
    return list(dict.fromkeys(points))


def evaluate(cfg: Config) -> list[dict]:
    """Sample every point of the sweep; with eval.metrics, score it. Returns report rows."""
    storage.configure(cfg.s3)  # every launcher's rank comes through here
    env = init_process_group(cfg.runtime.device, cfg.launch.gpus_per_worker > 0, cfg.runtime.socket_ifname,
                             cfg.runtime.rendezvous_timeout_s)
    if device().type == "cpu":
        # CPU kernels split their sums by thread count, and the count per process would
        # follow --nproc: on one thread each, every sample (every PNG byte, every
        # feature) is the same whatever the number of processes. The shards are
        # independent, so processes, not threads, are how sampling uses the cores.
        torch.set_num_threads(1)
    apply_device_numerics(cfg.runtime, device())  # TF32 and cuDNN autotuning, as training has them
    if env.is_main:
        LOG.info(describe(env))
    stops = StopRequests(cfg.train.preempt_signals)  # Ctrl-C, SIGTERM: stop at the next shard boundary
    try:
        job = EvalJob(cfg.eval, cfg.sample, cfg.diffusion, cfg.model.num_classes, cfg.data.resolution)
        unet, vae = load_models(cfg.eval.unet, unet_input_shape(cfg.vae, cfg.data), cfg.diffusion, cfg.vae,
                                cfg.data, device())
        extractor = build_extractor(cfg.eval, device()) if cfg.eval.metrics else None
        judge = Judge(cfg.eval.reference or cfg.data.shards, cfg.sample.num_samples, cfg.eval.classifier,
                      extractor, env) if extractor else None
        sampled = [_sample_timed(job, point, unet, vae, extractor, env, stops)
                   for point in sweep(job.sample, job.eval, job.diffusion.num_train_timesteps)]
    finally:
        stops.close()
    # Scoring is the main rank's work on the CPU (KID and precision/recall grow as N^2): the
    # ranks leave the process group first, so none waits for it in a collective that times out.
    shutdown()
    return _score_and_report(job, sampled, extractor, judge) if env.is_main else []


@dataclass(frozen=True)
class Sampled:
    """One sweep point once every rank wrote its shards."""

    point: Point
    seconds: float
    resumed_shards: int


def _sample_timed(job: EvalJob, point: Point, unet, vae, extractor, env, stops: StopRequests) -> Sampled:
    started = time.monotonic()
    resumed = sample_point(job, point, unet, vae, extractor, env, stops)
    return Sampled(point, time.monotonic() - started, resumed)


def _score_and_report(job: EvalJob, sampled: list[Sampled], extractor: Extractor | None,
                      judge: "Judge | None") -> list[dict]:
    """The main rank, alone: each point's figures from its shards' feature files, its row,
    its grid, and the report."""
    rows = []
    for done in sampled:
        point = done.point
        metrics = judge.score(point_features(job, point, extractor)) if judge else {}
        rows.append(result_row(point.applied_to(job.sample), job.diffusion.num_train_timesteps, job.eval, point.name,
                               metrics, done.seconds, done.resumed_shards))
        save_point_grid(job, point)
    write_report(job.eval, rows, extractor.id if extractor else None, judge.summary() if judge else {})
    return rows


def point_features(job: EvalJob, point: Point, extractor: Extractor) -> "PointFeatures":
    out = storage.parse(job.eval.out).join(point.name)
    return shard_order_sums(out, math.ceil(job.sample.num_samples / job.eval.samples_per_shard), extractor)


class Judge:
    """What samples are scored against: the reference statistics, as many real reference
    features as samples (KID, precision/recall), and the real-data FID floor at that N."""

    def __init__(self, shards: str, n: int, classifier_dir: str, extractor: Extractor, env):
        if not shards:
            raise ConfigError("eval.metrics needs reference images: set eval.reference (or data.shards) to the "
                              "image shards from prepare (held-out images: prepare with data.holdout_fraction)")
        self.extractor = extractor
        self.reference, cached = reference_stats(shards, extractor, env)
        self.real = reference_features(shards, extractor, n) if env.is_main else None
        floor_shards, self.floor_source = floor_images(shards)
        self.floor = real_floor(self.reference, floor_shards, extractor, n, env)
        self.shards, self.classifier = shards, _classifier_record(classifier_dir)
        if env.is_main:
            LOG.info(f"reference statistics of {shards} ({self.reference.count} images, {extractor.id}): "
                     f"{'cached' if cached else 'computed and cached'}; FID of {self.floor['fid_real_floor_n']} "
                     f"real images ({self.floor_source}) against it: {self.floor['fid_real_floor']:.3f}")

    def score(self, point: PointFeatures) -> dict:
        metrics = score(point, self.reference, self.real, self.extractor)
        floor = self.floor["fid_real_floor"]
        return {**metrics, "fid_real_floor": floor, "fid_vs_floor": metrics["fid"] / floor if floor > 0 else None}

    def summary(self) -> dict:
        """What the report says once about its judging."""
        return {"reference": self.shards, "reference_images": self.reference.count, **self.floor,
                "fid_real_floor_source": self.floor_source, **self.classifier}


def _classifier_record(classifier_dir: str) -> dict:
    """The judging classifier's own accuracy on real held-out images, from its export."""
    meta = Path(classifier_dir) / "dist_diffusion.json" if classifier_dir else None
    if meta is None or not meta.is_file():
        return {}
    accuracy = json.loads(meta.read_text()).get("accuracy")
    return {"classifier_accuracy": accuracy} if accuracy else {}


def load_models(unet_dir: str, want_shape: tuple[int, int, int], diffusion: DiffusionConfig, v: VAEConfig,
                data: DataConfig, where: torch.device):
    """The exported UNet and (latent space) the VAE, in fp32 on ``where``."""
    from diffusers import UNet2DModel

    from ..core.models import build_vae

    check_unet_dir(unet_dir, want_shape, diffusion)
    unet = UNet2DModel.from_pretrained(unet_dir).eval().float().to(where)
    vae = build_vae(v, data).eval().float().to(where) if v.enabled else None
    return unet, vae


def check_inputs(cfg: Config) -> None:
    """What the job reads, checked before any rank starts, each failure one line naming
    the key: the UNet export, with metrics on the reference and the feature network, and
    in latent space the VAE that decodes."""
    check_unet_dir(cfg.eval.unet, unet_input_shape(cfg.vae, cfg.data), cfg.diffusion)
    storage.check_bucket(cfg.eval.out)  # not found out at the first shard written
    if cfg.eval.metrics:
        if not (cfg.eval.reference or cfg.data.shards):
            raise ConfigError("eval.metrics needs reference images: set eval.reference (or data.shards) to the "
                              "image shards from prepare")
        check_extractor(cfg.eval)
    if cfg.vae.enabled and not cfg.vae.pretrained:
        raise ConfigError(f"eval.unet={cfg.eval.unet} denoises latents, but vae.pretrained is empty: they would be "
                          f"decoded by a randomly initialised VAE. Pass the VAE the UNet was trained with as "
                          f"vae.pretrained (or vae.enabled=false for a pixel-space UNet)")


def check_unet_dir(path: str, want_shape: tuple[int, int, int], diffusion: DiffusionConfig) -> None:
    """eval.unet must be a diffusers UNet2DModel directory (an export of a UNet run, not of
    its VAE or classifier) whose input shape (``want_shape``) and forward process are this
    config's: one line naming what differs, before any rank starts. A mismatch would not fail
    later: a convolutional UNet denoises any latent size, and any schedule, just badly."""
    config = Path(path) / "config.json" if path else None
    kind = json.loads(config.read_text()).get("_class_name") if config and config.is_file() else None
    if kind != "UNet2DModel":
        what = f"an exported {kind}, not a UNet" if kind else "not an exported UNet directory"
        raise ConfigError(f"eval.unet={path!r} is {what}; run `dist-diffusion export --run-dir RUN "
                          f"--out DIR` on a UNet run (train.target=unet) and pass eval.unet=DIR")
    problems = _unlike_export(Path(path), want_shape, diffusion)
    if problems:
        raise ConfigError(f"eval.unet={path} was trained otherwise: " + "; ".join(problems) +
                          "; set those keys as in the run's config.yaml")


def _unlike_export(path: Path, want: tuple[int, int, int], diffusion: DiffusionConfig) -> list[str]:
    net = json.loads((path / "config.json").read_text())
    side = net.get("sample_size")
    side = tuple(side) if isinstance(side, (list, tuple)) else (side, side)
    have = (net.get("in_channels"), *side)
    problems = []
    if None not in have and have != tuple(want):
        problems.append(f"it denoises {'x'.join(map(str, have))} inputs, this config samples {'x'.join(map(str, want))} "
                        f"(data.resolution, vae.latent_channels, vae.block_out_channels)")
    meta_file = path / "dist_diffusion.json"  # absent: not our export, nothing recorded to check
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    process = make_process(diffusion)  # the keys its export records; older exports imply some
    for key, here in process.export_record().items() if meta else ():
        learned = meta.get(key, process.recorded_before.get(key))
        if learned is not None and learned != here:
            problems.append(f"it learned diffusion.{key}={learned!r}, this config has {here!r}")
    return problems


def sample_point(job: EvalJob, point: Point, unet, vae, extractor: Extractor | None,
                 env, stops: StopRequests | None = None) -> int:
    """This rank's shards of one sweep point. Returns, on every rank, how many shards of all
    ranks were reused from an earlier run.
    A stop request (Ctrl-C, SIGTERM) ends the rank after the shard it is writing: every
    finished shard is kept, and the same command resumes from them."""
    out = storage.parse(job.eval.out).join(point.name)
    n, per_shard = job.sample.num_samples, job.eval.samples_per_shard
    shards = math.ceil(n / per_shard)
    mine = list(range(env.rank, shards, env.world_size))
    resumed = 0
    bar = tqdm(total=sum(min(n, (k + 1) * per_shard) - k * per_shard for k in mine), unit="img",
               desc=f"sample {point.name}", disable=not env.is_main)
    settings = point.applied_to(job.sample)
    for k in mine:
        indices = list(range(k * per_shard, min(n, (k + 1) * per_shard)))
        if storage.exists(out.join(f"samples-{k:06d}.npz")):
            resumed += 1
            bar.update(len(indices))
        else:
            _make_shard(settings, job.diffusion, job.num_classes, job.eval.write_png, unet, vae, extractor, indices,
                        out, k, bar)
        if stops is not None and stops.reason() != NO_STOP:
            bar.close()
            _stop_between_shards(point, k, stops.reason(), env.is_main)
    bar.close()
    resumed = int(all_reduce_sum(np.array([float(resumed)]))[0])  # also: every shard is written now
    if job.eval.npz and env.is_main:
        write_adm_npz(out, shards, n, job.resolution)
    return resumed


def _stop_between_shards(point: Point, shard: int, reason: int, is_main: bool) -> None:
    """No collective here: the ranks own disjoint shards, and each stops at its own boundary."""
    how = "preempted" if reason == PREEMPTED else "stopped by Ctrl-C"
    if is_main:
        LOG.info(f"{how} after shard {shard} of {point.name}: finished shards are kept; rerun the same "
                 f"command to resume")
    raise stop_exception(reason)


def shard_order_sums(out, shards: int, extractor: Extractor) -> "PointFeatures":
    """The point's statistics, summed from the shards' feature files in shard order: the
    same float64 additions in the same order whatever the number of workers, so every
    figure of the report compares equal with ``==`` across worker counts. One BLAS thread
    (the main rank's thread count follows the worker count). Memory: every sample's
    features and logits (float32), for KID, precision/recall and IS over splits."""
    sums, features, logits = FeatureSums.empty(extractor.dim, extractor.classes), [], []
    with threadpool_limits(limits=1):
        for k in range(shards):
            record = _load_record(out.join(f"samples-{k:06d}.npz"))
            sums.add(record["features"], record["logits"], record["labels"] if extractor.judges_labels else None)
            features.append(record["features"])
            logits.append(record["logits"])
    return PointFeatures(sums, np.concatenate(features), np.concatenate(logits))


@dataclass
class PointFeatures:
    """What the scores of one sweep point are computed from, in sample order."""

    sums: FeatureSums
    features: np.ndarray
    logits: np.ndarray


def labels_for(num_classes: int, indices: list[int]) -> torch.Tensor:
    """Class-balanced, fixed order: sample i asks for class i mod num_classes."""
    return torch.tensor([i % num_classes for i in indices])


def _make_shard(sample: SampleConfig, diffusion: DiffusionConfig, num_classes: int, write_png: bool, unet, vae,
                extractor, indices: list[int], out, k: int, bar) -> dict:
    images = []
    for start in range(0, len(indices), sample.batch_size):
        idx = indices[start:start + sample.batch_size]
        x = generate(sample, diffusion, unet, labels_for(num_classes, idx), idx)
        if vae is not None:
            x = decode_on_its_device(vae, x, sample.network_batch)
        images.append(to_uint8(x[:, :3]).cpu())
        bar.update(len(idx))
        bar.set_postfix(img_per_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.1f}")
    images = torch.cat(images)
    labels = labels_for(num_classes, indices).numpy()
    _write_images(out, k, indices, images, labels, write_png)
    feats, logits = extractor(images) if extractor else (np.zeros((len(indices), 1)), np.zeros((len(indices), 1)))
    record = {"labels": labels, "features": feats.astype(np.float32), "logits": logits.astype(np.float32)}
    buf = io.BytesIO()
    np.savez(buf, features=record["features"], logits=record["logits"], labels=labels)
    storage.write_bytes(out.join(f"samples-{k:06d}.npz"), buf.getvalue())  # last: marks the shard complete
    return record


def _write_images(out, k: int, indices: list[int], images: torch.Tensor, labels: np.ndarray, write_png: bool) -> None:
    pngs = [_png(img) for img in images]
    samples = [(f"{i:08d}", {"png": png, "cls": str(int(y)).encode()}) for i, png, y in zip(indices, pngs, labels)]
    upload_tar(out.join(f"samples-{k:06d}.tar"), samples)
    if write_png:
        for i, png in zip(indices, pngs):
            storage.write_bytes(out.join(f"png/{i:08d}.png"), png)


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _load_record(sidecar) -> dict:
    with np.load(io.BytesIO(storage.read_bytes(sidecar))) as f:
        return {name: f[name] for name in ("features", "logits", "labels")}


def score(point: PointFeatures, reference: FeatureSums, real: np.ndarray | None, extractor: Extractor) -> dict:
    """Every figure of one point. ``real``: reference features (for KID and
    precision/recall; None when the reference cache predates per-shard feature files)."""
    mu, cov = point.sums.mean_cov()
    ref_mu, ref_cov = reference.mean_cov()
    with threadpool_limits(limits=1):  # LAPACK's eigh: the same bits whatever the thread count
        metrics = {"fid": frechet_distance(mu, cov, ref_mu, ref_cov), **fid_infinity(point.features, ref_mu, ref_cov)}
    is_mean, is_std = inception_score(point.logits)
    metrics.update(inception_score=is_mean, inception_score_std=is_std, inception_score_splits=IS_SPLITS)
    if real is not None:  # BLAS splits rows and columns among threads, not the sums: any thread count
        metrics["kid"], metrics["kid_std"] = kernel_inception_distance(real, point.features)
        metrics["precision"], metrics["recall"] = precision_recall(real, point.features)
    metrics["features"] = extractor.id
    if extractor.judges_labels:
        metrics["class_accuracy"] = point.sums.accuracy()
    return metrics


def save_point_grid(job: EvalJob, point: Point) -> None:
    """Grid of the first samples, one row per class (at most 10), read back from the shards."""
    from ..data.stream import parse_tar

    out, num_classes, n = storage.parse(job.eval.out).join(point.name), job.num_classes, job.sample.num_samples
    classes = min(num_classes, 10)
    per = min(job.eval.grid_per_class, n // num_classes)
    if per == 0:
        return
    needed = min(n, num_classes * per)
    images, k = {}, 0
    while len(images) < needed and storage.exists(out.join(f"samples-{k:06d}.tar")):
        for s in parse_tar(storage.read_bytes(out.join(f"samples-{k:06d}.tar"))):
            i = int(s["__key__"])
            if i < needed:
                images[i] = torch.from_numpy(np.array(Image.open(io.BytesIO(s["png"])).convert("RGB"))).permute(2, 0, 1)
        k += 1
    rows = [[images[i] for i in sorted(images) if i % num_classes == c][:per] for c in range(classes)]
    rows = [r for r in rows if len(r) == per]
    if not rows:
        return
    grid = torch.stack([img for row in rows for img in row]).float() / 127.5 - 1
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = save_grid(grid, f"{tmp}/grid.png", nrow=per, scale=2)
        storage.write_bytes(out.join("grid.png"), path.read_bytes())
