"""The config tree's schema: one typed dataclass per section, a one-line doc, a default and
the bounds of every field (``metadata``). Torch-free; within the package it imports only the
registry (the names of the forward processes and samplers, its choices): every other part
of the config, and every component, builds on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from .registry import PROCESSES, SAMPLERS, choices_doc


class ConfigError(ValueError):
    """A bad config: the message names the key, the source and the fix."""


class _Section:
    """A config section: read-only once validated, so what a launcher checked is what
    every rank runs; :func:`derive` makes a changed copy."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"the config is frozen after validation; use config.derive(cfg, {{'<section>.{name}': ...}})")
        object.__setattr__(self, name, value)


def _f(default: Any, doc: str, *, choices: Sequence[Any] | None = None, ge: float | None = None,
       le: float | None = None, gt: float | None = None, lt: float | None = None):
    """A dataclass field with its doc and the range :func:`validate` enforces."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "le": le, "gt": gt, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# UNet sizes. "base" is the ~35M-parameter UNet of the reference report (32x32x4 latents).
UNET_PRESETS = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, attention_levels=[False, True],
                 norm_num_groups=8, attention_head_dim=8),
    "small": dict(block_out_channels=[64, 128, 128], layers_per_block=1,
                  attention_levels=[False, True, True], norm_num_groups=16, attention_head_dim=16),
    "base": dict(block_out_channels=[128, 256, 256, 256], layers_per_block=2,
                 attention_levels=[False, True, True, False], norm_num_groups=32,
                 attention_head_dim=32),
}


@dataclass
class ModelConfig(_Section):
    """The class-conditional UNet (diffusers ``UNet2DModel``)."""

    preset: str = _f("tiny", "UNet size; the fields below left empty take the preset's value",
                     choices=sorted(UNET_PRESETS))
    num_classes: int = _f(10, "number of real classes; the null (CFG) label is num_classes", ge=1)
    block_out_channels: List[int] = _f([], "channels per resolution level (empty: from preset)")
    layers_per_block: Optional[int] = _f(None, "ResNet blocks per level (null: from preset)", ge=1)
    attention_levels: List[bool] = _f([], "self-attention on/off per level (empty: from preset)")
    norm_num_groups: Optional[int] = _f(None, "GroupNorm groups (null: from preset)", ge=1)
    attention_head_dim: Optional[int] = _f(None, "channels per attention head (null: from preset)",
                                           ge=1)
    dropout: float = _f(0.0, "dropout inside ResNet blocks", ge=0.0, lt=1.0)


@dataclass
class VAEConfig(_Section):
    """The autoencoder mapping images to latents (diffusers ``AutoencoderKL``)."""

    enabled: bool = _f(True, "train in latent space; false trains the UNet on pixels")
    pretrained: str = _f("", "local directory of a diffusers AutoencoderKL (e.g. an SD-VAE); "
                             "empty builds the small VAE below")
    latent_channels: int = _f(4, "channels of the latent", ge=1)
    block_out_channels: List[int] = _f([32, 64], "encoder channels per level; each level after "
                                                 "the first halves the resolution")
    layers_per_block: int = _f(1, "ResNet blocks per level", ge=1)
    norm_num_groups: int = _f(8, "GroupNorm groups", ge=1)
    scaling_factor: float = _f(1.0, "a fresh VAE's latent scale; a trained VAE's export measures its own "
                                    "per-channel statistics (see calibration_images), a pretrained one keeps "
                                    "its config's (SD-VAE: 0.18215)", gt=0.0)
    calibration_images: int = _f(1024, "VAE export: training images its latent mean/std per channel are "
                                       "measured on, so diffusion latents have unit variance", ge=1)
    sample_posterior: bool = _f(True, "encode by sampling the posterior (false: its mean)")
    kl_weight: float = _f(1e-6, "VAE training: weight of KL(q(z|x) || N(0, I)) (summed over the "
                                "latent) against the per-pixel reconstruction loss", ge=0.0)
    recon_loss: str = _f("l1", "VAE training: reconstruction loss", choices=["l1", "mse"])
    adversarial_weight: float = _f(0.0, "VAE training: weight of a patch discriminator's hinge loss on the "
                                        "decoded images (LDM's autoencoder), which keeps texture the "
                                        "reconstruction loss alone smears; 0 trains without one", ge=0.0)
    discriminator_width: int = _f(32, "VAE training: channels of the patch discriminator's first stage "
                                      "(it has 3 convolutions, width x 1, 2, 2)", ge=8)


@dataclass
class DiffusionConfig(_Section):
    """Forward process and training objective."""

    process: str = _f("ddpm", "forward process: " + choices_doc(PROCESSES), choices=list(PROCESSES))
    num_train_timesteps: int = _f(1000, "T, the number of diffusion steps", ge=2)
    schedule: str = _f("linear", "beta schedule", choices=["linear", "scaled_linear", "cosine"])
    beta_start: Optional[float] = _f(None, "first beta (null: 1e-4 linear, 0.00085 scaled_linear)",
                                     gt=0.0, lt=1.0)
    beta_end: Optional[float] = _f(None, "last beta (null: 0.02 linear, 0.012 scaled_linear)",
                                   gt=0.0, lt=1.0)
    snr_shift: float = _f(1.0, "divide the schedule's SNR at every step by snr_shift^2 (simple diffusion): "
                               "2 for latents of twice the side the schedule was tuned at; pair it with "
                               "prediction=v (epsilon gives x0 divided by alpha_t, tiny once shifted)", gt=0.0)
    prediction: str = _f("epsilon", "what the UNet predicts", choices=["epsilon", "v"])
    min_snr_gamma: float = _f(0.0, "min-SNR-gamma loss weighting (Hang et al. 2023); 0 is off",
                              ge=0.0)
    time_distribution: str = _f("uniform", "training distribution of t. rectified_flow: uniform on [0, 1], or "
                                           "logit_normal, sigmoid(N(logit_mean, logit_std^2)) (SD3, which "
                                           "trains on the middle of the path most); ddpm: uniform on 0..T-1",
                                choices=["uniform", "logit_normal"])
    logit_mean: float = _f(0.0, "time_distribution=logit_normal: mean m of the normal whose sigmoid is t (SD3: 0)")
    logit_std: float = _f(1.0, "time_distribution=logit_normal: standard deviation s of that normal (SD3: 1)",
                          gt=0.0)
    label_dropout: float = _f(0.1, "probability a label is replaced by the null label (CFG)",
                              ge=0.0, le=1.0)


@dataclass
class DataConfig(_Section):
    """Where the training images come from, their shape, and how shards are written."""

    resolution: int = _f(32, "image side in pixels (square); the stream resizes and crops shards of "
                             "original-size images to it (ADM's box-halving, bicubic, crop)", ge=8)
    image_channels: int = _f(3, "channels of the images", ge=1)
    image_format: str = _f("jpeg", "how prepare encodes images in shards", choices=["jpeg", "png"])
    jpeg_quality: int = _f(95, "JPEG quality for prepare", ge=1, le=100)
    samples_per_shard: int = _f(1000, "samples per WebDataset tar shard written by prepare", ge=1)
    shard_prefix: str = _f("shard", "shard file names: <prefix>-000000.tar", )
    prepare_workers: int = _f(2, "processes prepare uses to decode, resize and encode", ge=1)
    shuffle_seed: int = _f(0, "seed of the file order prepare writes (mixes classes in shards)")
    labels_file: str = _f("", "optional file of '<folder> <class name>' lines (ImageNet synsets)")
    holdout_fraction: float = _f(0.0, "prepare: this share of the images (chosen by a seeded hash of each "
                                      "file's path, so the split is stable) goes to OUT/holdout instead: the "
                                      "held-out images FID references and the judges are scored on", ge=0.0, lt=1.0)
    label_key: str = _f("", "index: read each label from this field of the sample's .json "
                            "instead of its .cls (e.g. img2dataset metadata)")
    hflip: bool = _f(True, "random horizontal flip while streaming (off for digits and text)")
    crop: str = _f("center", "how the stream crops an image that is not data.resolution square after "
                             "resizing its short side to it: the center (ADM, DiT), or a random offset "
                             "drawn per sample and epoch from the run's seed (exact resume holds)",
                   choices=["center", "random"])
    shards: str = _f("", "training shards (image or latent, from prepare/encode): a directory "
                         "or s3://bucket/prefix")
    num_workers: int = _f(1, "dataloader worker processes per rank (0: read in the main process)",
                          ge=0)
    max_corrupt_fraction: float = _f(0.01, "stop the run when more samples than this are corrupt",
                                     ge=0.0, le=1.0)


@dataclass
class S3Config(_Section):
    """Time limits and retries of every S3 request (one retry layer: botocore's for single
    requests, ours for downloads, which resume at the byte they reached)."""

    connect_timeout_s: float = _f(5.0, "seconds to open a connection to the S3 endpoint", gt=0.0)
    read_timeout_s: float = _f(12.0, "seconds without a byte from S3 before a request is abandoned "
                                     "(a download is then resumed at the byte it reached)", gt=0.0)
    attempts: int = _f(3, "tries of an S3 request before it fails; a download try that received "
                          "bytes does not count (with the defaults a dead endpoint fails within 60 s)",
                       ge=1)


@dataclass
class PostHocEMAConfig(_Section):
    """Post-hoc EMA (EDM2): power-function EMA profiles tracked beside the EMA and saved as
    snapshots, from which `dist-diffusion ema-reconstruct` builds the EMA of any relative
    length after training."""

    posthoc_sigma_rels: List[float] = _f([], "relative widths of the power-function EMA profiles to track (EDM2: "
                                             "[0.05, 0.10]); empty: off")
    snapshot_every: int = _f(0, "steps between snapshots of the profiles, a multiple of train.ckpt_every (a snapshot "
                                "is taken with a checkpoint and kept in RUN/ema_snapshots when the checkpoint is "
                                "pruned); 0: every checkpoint", ge=0)


@dataclass
class TrainConfig(_Section):
    """The optimisation loop."""

    target: str = _f("unet", "what this run trains: the diffusion UNet, the VAE it uses, or the domain "
                             "classifier that scores samples",
                     choices=["unet", "vae", "classifier"])
    max_steps: int = _f(1000, "optimizer steps to train for", ge=1)
    batch_size: int = _f(64, "global batch size (all processes, all accumulation steps)", ge=1)
    lr: float = _f(2e-4, "peak AdamW learning rate", gt=0.0)
    warmup_steps: int = _f(100, "linear LR warm-up steps", ge=0)
    lr_schedule: str = _f("constant", "LR after warm-up", choices=["constant", "cosine"])
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    grad_clip: float = _f(1.0, "gradient norm clip; 0 is off", ge=0.0)
    ema_decay: float = _f(0.9999, "EMA decay per step (used when ema_half_life_steps is 0)",
                          ge=0.0, le=1.0)
    ema_half_life_steps: float = _f(0.0, "EMA half-life in steps; overrides ema_decay when > 0",
                                    ge=0.0)
    ema_warmup: bool = _f(True, "ramp the EMA decay up as (1+step)/(10+step) early in training")
    ema: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)
    seed: int = _f(0, "seed of every training random draw")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", ge=1)
    log_every: int = _f(10, "steps between log lines", ge=1)
    ckpt_every: int = _f(500, "steps between checkpoints (one is always written at the end)", ge=1)
    ckpt_every_minutes: float = _f(0.0, "also checkpoint once this many minutes passed since the last "
                                        "save, checked every preempt_check_every steps (all ranks "
                                        "agree); 0 is off", ge=0.0)
    background_checkpoints: bool = _f(True, "write checkpoints from host copies on a thread while the next steps "
                                            "run; a checkpoint is marked complete at the first preemption check "
                                            "after every rank's files (and upload) are durable. false: each save "
                                            "blocks until it is complete")
    keep_last: int = _f(2, "complete checkpoints kept; older ones are deleted", ge=1)
    sample_every: int = _f(0, "steps between EMA sample grids (DDIM + CFG); 0 is off", ge=0)
    nan_policy: str = _f("stop", "on a NaN/inf loss: stop cleanly, or skip the step and count it",
                         choices=["stop", "skip"])
    preempt_signals: List[str] = _f(["SIGTERM", "SIGUSR1"], "signals that save a checkpoint "
                                                             "and exit with the requeue code")
    preempt_check_every: int = _f(10, "steps between checks for a preemption signal or the wall-time "
                                      "limit (each check is a collective; one per step stalls GPUs)",
                                  ge=1)
    wall_time_limit_s: float = _f(0.0, "save and exit (requeue code) before this many seconds "
                                       "of run time; 0 is off", ge=0.0)
    run_dir: str = _f("runs/default", "directory for logs, grids and checkpoints")
    ckpt_url: str = _f("", "also upload every complete checkpoint here (s3://bucket/prefix); a run "
                           "whose run_dir has none resumes from the newest one there")


@dataclass
class RuntimeConfig(_Section):
    """How processes and numerics are set up."""

    precision: str = _f("auto", "training precision. auto: bf16 on GPUs that support it and on CPUs with "
                                "native bf16 (AVX512-BF16, AMX), fp32 otherwise (a CPU without native bf16 "
                                "runs bf16 25-116x slower); the run's log names the choice and why",
                        choices=["auto", "bf16", "fp32"])
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage", ge=0, le=3)
    device: str = _f("auto", "auto: cuda:LOCAL_RANK when CUDA is available, else cpu; cuda fails "
                             "loudly without CUDA instead of training on the CPU",
                     choices=["auto", "cpu", "cuda"])
    nproc: int = _f(1, "processes `dist-diffusion train` starts on this machine", ge=1)
    compile: bool = _f(False, "torch.compile the model through DeepSpeed (engine.compile); the first "
                              "steps are slow while it compiles")
    channels_last: bool = _f(False, "NHWC memory format for the network and its inputs (faster convs "
                                    "on tensor cores; CPU results then differ in the last bits)")
    tf32: bool = _f(True, "allow TF32 in fp32 matmuls and convolutions on Ampere+ GPUs (no effect on "
                          "CPU or on bf16 math)")
    overlap_comm: bool = _f(False, "ZeRO: overlap gradient reduction with the backward pass (worth it "
                                   "for models of hundreds of millions of parameters)")
    socket_ifname: str = _f("", "network interface the process group talks over (GLOO_SOCKET_IFNAME / "
                                "NCCL_SOCKET_IFNAME); empty: the one that routes to the master address")
    rendezvous_timeout_s: float = _f(600.0, "a rank whose peers do not all join (or answer a collective) "
                                            "within this many seconds stops with an error", gt=0.0)
    bucket_size: int = _f(50_000_000, "ZeRO reduce/all-gather bucket size in elements (the staging "
                                      "buffer is this many gradient elements)", ge=1_000_000)


@dataclass
class SampleConfig(_Section):
    """Generation: sampler, guidance and seeds."""

    sampler: str = _f("ddim", "sampling algorithm, one of diffusion.process's: " + choices_doc(SAMPLERS),
                      choices=list(SAMPLERS))
    order: int = _f(2, "UniPC's order (2 or 3 are the usual; 1 is DDIM with a corrector)", ge=1, le=3)
    steps: int = _f(50, "sampling steps (ddpm always uses all T)", ge=1)
    eta: float = _f(0.0, "DDIM stochasticity: 0 deterministic, 1 DDPM-like", ge=0.0, le=1.0)
    spacing: str = _f("leading", "how DDIM/DPM-Solver pick timesteps from 0..T-1",
                      choices=["leading", "trailing", "linspace"])
    guidance_scale: float = _f(3.0, "classifier-free guidance scale s: eps_u + s (eps_c - eps_u)",
                          ge=0.0)
    guidance_interval: List[int] = _f([], "[lo, hi]: guide only for timesteps lo <= t <= hi of 0..T-1 (empty: every "
                                          "step); under rectified_flow the times lo/(T-1) <= t <= hi/(T-1), the same "
                                          "share of the way from data to noise")
    clip_x0: bool = _f(False, "clip the predicted x0 to [-1, 1] (pixel space only)")
    precision: str = _f("fp32", "network precision while sampling: fp32, or bf16 autocast around "
                                "the network (the sampler's arithmetic stays fp32)",
                        choices=["fp32", "bf16"])
    num_samples: int = _f(16, "images to generate", ge=1)
    batch_size: int = _f(16, "images advanced through the sampler together", ge=1)
    network_batch: int = _f(0, "rows of every network call (UNet, VAE decoder): a batch is cut into "
                               "blocks of this many, the last padded, so a sample's arithmetic does not "
                               "depend on sample.batch_size (0: the whole batch in one call, fastest)", ge=0)
    seed: int = _f(0, "base seed; sample i draws all its noise from seed (base, i)")


@dataclass
class EvalConfig(_Section):
    """The sampling job: where the model and the samples are, and how they are judged."""

    unet: str = _f("", "exported UNet directory (`dist-diffusion export`) to sample from")
    out: str = _f("runs/eval", "directory or s3:// prefix for sample shards, grids and the report")
    samples_per_shard: int = _f(64, "samples per output shard: the unit a restarted job skips", ge=1)
    write_png: bool = _f(False, "also write every sample as a PNG under OUT/png/")
    npz: bool = _f(False, "also write OUT/<point>/samples_NxHxWx3.npz (ADM: uint8 NHWC arr_0, labels arr_1)")
    metrics: bool = _f(True, "compute FID / IS / class accuracy while sampling")
    features: str = _f("classifier", "feature network: the FID Inception-v3, or the domain classifier",
                       choices=["inception", "classifier"])
    inception_weights: str = _f("", "path or s3:// URL of the FID Inception weights "
                                    "(pt_inception-2015-12-05-6726825d.pth)")
    classifier: str = _f("", "exported domain classifier directory (a run with train.target=classifier)")
    reference: str = _f("", "image shards for the reference statistics (empty: data.shards)")
    guidance_scales: List[float] = _f([], "sweep: CFG scales to evaluate in one job (empty: sample.guidance_scale)")
    steps: List[int] = _f([], "sweep: sampler step counts to evaluate (empty: sample.steps)")
    samplers: List[str] = _f([], "sweep: samplers to evaluate, NAME (takes eval.steps) or NAME:STEPS "
                                 "(empty: sample.sampler; ddpm always takes T steps)")
    grid_per_class: int = _f(8, "samples per class row in the grid PNG", ge=1)
    ema_sigma_rels: List[float] = _f([], "post-hoc EMA: evaluate the EMA of each of these relative lengths, "
                                         "reconstructed from train.run_dir's profile snapshots (eval.unet is not "
                                         "used), one report row each and OUT/fid_vs_ema_length.png")
    during_training: bool = _f(False, "evaluate the EMA of the run's checkpoints beside training, as they become "
                                      "complete (`dist-diffusion watch`: local `train` starts it on its own cores, "
                                      "slurm/train_latent.sh as a companion job, the Ray launcher as an actor); "
                                      "each step's report goes to RUN/eval/step-NNNNNN/, the curve to RUN/eval/")
    every_checkpoints: int = _f(1, "during training: evaluate every Nth checkpoint of the train.ckpt_every "
                                   "schedule, and the last", ge=1)
    every_steps: int = _f(0, "during training: evaluate about every this many steps instead, each rounded up to "
                             "the next checkpoint of the train.ckpt_every schedule (0: use every_checkpoints)", ge=0)
    nproc: int = _f(1, "processes the watcher samples each checkpoint with (on one machine)", ge=1)
    cpus: int = _f(1, "CPU cores of the watcher's own resources: local `train` pins it to the last ones, the SLURM "
                      "companion job asks --cpus-per-task, the Ray actor num_cpus", ge=1)
    gpus: int = _f(0, "GPUs of the watcher's own resources (SLURM companion job, Ray actor)", ge=0)
    best_metric: str = _f("fid", "the figure of the sweep's first point that names RUN/eval/best (lower is better "
                                 "for fid, fid_vs_floor, fid_inf and kid; higher for the others)",
                          choices=["fid", "fid_vs_floor", "fid_inf", "kid", "inception_score", "class_accuracy",
                                   "precision", "recall"])
    idle_minutes: float = _f(120.0, "the watcher ends after this long without a new complete checkpoint (a "
                                    "run that died without a word); it also ends once the last step is "
                                    "evaluated, or once the launcher marks training ended", gt=0.0)


TRACKERS = ["tensorboard", "wandb", "mlflow"]


@dataclass
class LogConfig(_Section):
    """Where the run's figures go besides metrics.jsonl: rank 0 (and the eval watcher) log the
    config as hyperparameters, the training scalars, the eval curves and the grids."""

    trackers: List[str] = _f(["tensorboard"], "experiment trackers, any of " + ", ".join(TRACKERS) +
                             " (wandb and mlflow: the [wandb] / [mlflow] extras); a resumed run continues the "
                             "same tracker run (its id is kept in RUN/trackers.json)")
    project: str = _f("dist-diffusion", "W&B project / MLflow experiment the run is logged under")
    wandb_mode: str = _f("", "W&B mode: online, offline (sync later with `wandb sync`), or empty for "
                             "WANDB_MODE / W&B's default", choices=["", "online", "offline"])
    mlflow_tracking_uri: str = _f("", "MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else RUN/mlruns)")


@dataclass
class LaunchConfig(_Section):
    """Where the processes run on a cluster (Ray Train, SLURM via submitit or sbatch)."""

    nodes: int = _f(1, "machines the job spans", ge=1)
    workers_per_node: int = _f(1, "training processes per machine (one per GPU on GPU nodes)", ge=1)
    gpus_per_worker: int = _f(0, "GPUs each process gets (0: CPU training; each process drives one GPU, "
                                 "so more than 1 is refused)", ge=0)
    cpus_per_worker: int = _f(1, "CPU cores each process gets (dataloader workers + the step)", ge=1)
    partition: str = _f("", "SLURM partition (empty: the cluster's default)")
    time_limit_min: int = _f(1440, "SLURM time limit of one allocation; the run requeues past it", ge=1)
    signal_delay_s: int = _f(120, "SLURM sends the preemption signal this long before the time "
                                  "limit, so the run saves and requeues", ge=1)
    job_dir: str = _f("runs/submitit", "submitit's folder for job scripts, logs and results")
    ray_address: str = _f("auto", "Ray cluster to join (auto: the one this process runs in)")
    storage_path: str = _f("", "Ray Train persistent storage for checkpoints: s3://bucket/prefix on "
                               "a cloud cluster, a shared path on-prem (empty: RUN_DIR/ray)")
    max_failures: int = _f(3, "Ray Train restarts from the latest checkpoint after a worker dies, "
                              "at most this many times", ge=0)

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node


@dataclass
class Config(_Section):
    """The whole tree; one of these drives every command."""

    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    s3: S3Config = field(default_factory=S3Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _most_steps(sampler: str, num_train_timesteps: int) -> int:
    return SAMPLERS[sampler].most_steps(num_train_timesteps)


def parse_sampler_entry(entry: str) -> tuple[str, Optional[int]]:
    """An eval.samplers entry: 'ddim' (its steps from the sweep) or 'ddim:100' (pinned)."""
    name, _, steps = str(entry).partition(":")
    if name not in SAMPLERS:
        raise ValueError(f"{name!r} is not a sampler; choose from {list(SAMPLERS)}, optionally as NAME:STEPS")
    if steps and not steps.isdigit():
        raise ValueError(f"{entry!r}: write NAME:STEPS with a whole number of steps, e.g. ddim:100")
    return name, int(steps) if steps else None
