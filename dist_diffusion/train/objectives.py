"""What a run optimises, one class per ``train.target``: the network it builds, the data it
needs, its per-sample loss, and what its export is. The loop, the logger, the CLI and
``export`` ask the objective; nothing else compares ``train.target`` with a name.

An objective is a frozen dataclass whose fields are the config sections it reads (named
as in the tree): :func:`objective` fills them, and no objective sees the rest of the tree.
A new objective is a subclass here and one entry in :data:`OBJECTIVES` (and the
``train.target`` choices in the config schema).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..config import Config, DataConfig, DiffusionConfig, ModelConfig, RuntimeConfig, S3Config, TrainConfig, VAEConfig

if TYPE_CHECKING:
    import torch

# torch and the networks are imported inside the methods: a launcher asks an objective
# what data it needs (train.checks) before any rank starts, in a process that never
# trains and should not pay the 5 s import of torch and diffusers.


class Objective(ABC):
    name = ""
    needs_image_shards = False  # trains on pixels, so latent shards cannot serve it
    conditions_on_classes = False  # the shards' classes must fit model.num_classes
    draws_grids = False  # train.sample_every writes sample grids
    export_kind = ""  # the diffusers class of its export

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """The network, freshly initialised."""

    def check(self) -> None:
        """This objective's rules for the recipe, checked before any rank starts (one
        ConfigError naming the fix)."""

    def encodes_with_vae(self, shard_kind: str) -> bool:
        """Whether shards of ``shard_kind`` (images, latents) go through the frozen VAE
        before the loss."""
        return False

    @abstractmethod
    def loss(self, engine, process, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        """(per-sample loss, noise levels in [0, 1] or None) of one micro-batch: ``engine`` runs
        the network (its ``module`` is the network itself), ``process`` is the forward process
        (core.processes, on the device), ``gen`` the micro-step's CPU generator."""

    def exported(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the trained module that export writes (all of it, unless the
        objective trains helpers beside its network)."""
        return model

    def measure_export(self, model: torch.nn.Module) -> dict:
        """What the export measures on the data and records beside the weights (it may
        also set the model's config, before it is saved)."""
        return {}


def _dtype(runtime: RuntimeConfig) -> torch.dtype:
    import torch

    return torch.bfloat16 if runtime.precision == "bf16" else torch.float32


def on_device(gen: torch.Generator, where: torch.device) -> torch.Generator:
    """The step's generator on the compute device (same seed), so bulk draws (t, noise,
    label dropout) are made there with no host-to-device copy; on CPU it is ``gen``."""
    import torch

    if where.type == "cpu":
        return gen
    return torch.Generator(device=where).manual_seed(gen.initial_seed())


@dataclass(frozen=True)
class Diffusion(Objective):
    """The class-conditional UNet, learning the configured forward process (its target, its
    distribution of t) under label dropout."""

    model: ModelConfig
    vae: VAEConfig
    diffusion: DiffusionConfig
    data: DataConfig
    runtime: RuntimeConfig
    name, conditions_on_classes, draws_grids, export_kind = "unet", True, True, "UNet2DModel"

    def build(self) -> torch.nn.Module:
        from ..config import unet_input_shape
        from ..core.models import build_unet

        return build_unet(self.model, unet_input_shape(self.vae, self.data))

    def encodes_with_vae(self, shard_kind: str) -> bool:
        return self.vae.enabled and shard_kind == "images"

    def loss(self, engine, process, x0, labels, gen):
        import torch

        from ..core.losses import drop_labels
        from ..core.models import null_label

        n, gen = x0.shape[0], on_device(gen, x0.device)
        t = process.sample_time(n, gen)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device)
        labels = drop_labels(labels, self.diffusion.label_dropout, null_label(self.model),
                             torch.rand(n, generator=gen, device=gen.device))
        dtype = _dtype(self.runtime)

        def denoise(x, tt, y):
            return engine(x.to(dtype), tt, class_labels=y).sample

        per_sample = process.loss(denoise, x0.float(), labels, t, noise.float())
        return per_sample, process.noise_level(t)


@dataclass(frozen=True)
class VAE(Objective):
    """The autoencoder the latent runs use: reconstruction + KL, and with
    ``vae.adversarial_weight`` a patch discriminator trained beside it (never exported)."""

    vae: VAEConfig
    data: DataConfig
    runtime: RuntimeConfig
    train: TrainConfig
    s3: S3Config
    name, needs_image_shards, export_kind = "vae", True, "AutoencoderKL"

    def check(self) -> None:
        from ..config import ConfigError

        if self.vae.adversarial_weight > 0 and self.runtime.zero_stage == 3:
            # the decoder's term runs the discriminator on detached whole parameters
            raise ConfigError(f"vae.adversarial_weight={self.vae.adversarial_weight:g} needs runtime.zero_stage 1 "
                              f"or 2: ZeRO-3 partitions the discriminator's parameters")

    def build(self) -> torch.nn.Module:
        from ..core.models import build_vae
        from ..core.vae_loss import AdversarialAutoencoder, PatchDiscriminator

        vae = build_vae(self.vae, self.data)
        if self.vae.adversarial_weight == 0:
            return vae
        return AdversarialAutoencoder(vae, PatchDiscriminator(self.data.image_channels, self.vae.discriminator_width))

    def exported(self, model):
        return getattr(model, "vae", model)

    def loss(self, engine, process, x0, labels, gen):
        from ..core.vae_loss import vae_loss

        v, module = self.vae, engine.module
        return vae_loss(self.exported(module), x0.to(_dtype(self.runtime)), gen, v.kl_weight, v.recon_loss,
                        getattr(module, "discriminator", None), v.adversarial_weight), None

    def measure_export(self, model):
        """Latent statistics on the training images (written into the VAE's config, so its
        latents are unit-variance per channel) and the reconstruction PSNR."""
        from ..latents.calibrate import calibrate, image_batches, reconstruction_psnr
        from ..data import storage

        storage.configure(self.s3)
        model.eval()
        stats = calibrate(model, self.data.shards, self.vae.calibration_images, self.train.seed)
        judged_on = heldout_url(self.data.shards)
        quality = reconstruction_psnr(model, image_batches(judged_on, 1024, self.train.seed))
        return {"latent_stats": stats, "reconstruction": {**quality, "images": judged_on}}


@dataclass(frozen=True)
class Classifier(Objective):
    """The domain classifier that judges class accuracy of samples."""

    model: ModelConfig
    data: DataConfig
    runtime: RuntimeConfig
    train: TrainConfig
    s3: S3Config
    name, needs_image_shards, conditions_on_classes, export_kind = "classifier", True, False, "DomainClassifier"

    def build(self) -> torch.nn.Module:
        from ..core.models import build_classifier

        return build_classifier(self.model, self.data)

    def loss(self, engine, process, x0, labels, gen):
        import torch

        logits = engine(x0.to(_dtype(self.runtime))).float()
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none"), None

    def measure_export(self, model):
        """Accuracy on the held-out split (on the training images when there is none)."""
        from ..latents.calibrate import classification_accuracy, image_batches
        from ..data import storage

        storage.configure(self.s3)
        judged_on = heldout_url(self.data.shards)
        accuracy = classification_accuracy(model.eval(), image_batches(judged_on, 10**9, self.train.seed,
                                                                        labels=True))
        return {"accuracy": {**accuracy, "images": judged_on, "held_out": judged_on != self.data.shards}}


def heldout_url(shards_url: str) -> str:
    """The held-out split prepare wrote beside ``shards_url`` (``data.holdout_fraction``),
    else ``shards_url`` itself."""
    from ..data.shards import load_manifest

    return load_manifest(shards_url).get("holdout", {}).get("url", shards_url)


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (Diffusion, VAE, Classifier)}


def objective(cfg: Config) -> Objective:
    """The objective of ``train.target`` (validated by the config schema against these
    names), holding the sections it reads and no others."""
    chosen = OBJECTIVES[cfg.train.target]
    return chosen(**{section.name: getattr(cfg, section.name) for section in fields(chosen)})
