"""What a run optimises, one class per ``train.target``: the network it builds, the data it
needs, its per-sample loss, and what its export is. The loop, the logger, the CLI and
``export`` ask the objective; nothing else compares ``train.target`` with a name.

A new objective is a subclass here and one entry in :data:`OBJECTIVES` (and the
``train.target`` choices in the config schema).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from ..config import Config

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
    def build(self, cfg: Config) -> torch.nn.Module:
        """The network, freshly initialised."""

    def check(self, cfg: Config) -> None:
        """This objective's rules for the recipe, checked before any rank starts (one
        ConfigError naming the fix)."""

    def encodes_with_vae(self, cfg: Config, manifest: dict) -> bool:
        """Whether image shards go through the frozen VAE before the loss."""
        return False

    @abstractmethod
    def loss(self, run, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        """(per-sample loss, noise levels in [0, 1] or None) of one micro-batch; ``run`` has
        engine, cfg and the forward process; ``gen`` is the micro-step's CPU generator."""

    def exported(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the trained module that export writes (all of it, unless the
        objective trains helpers beside its network)."""
        return model

    def measure_export(self, model: torch.nn.Module, cfg: Config) -> dict:
        """What the export measures on the data and records beside the weights (it may
        also set the model's config, before it is saved)."""
        return {}


def _dtype(cfg: Config) -> torch.dtype:
    import torch

    return torch.bfloat16 if cfg.runtime.precision == "bf16" else torch.float32


def on_device(gen: torch.Generator, where: torch.device) -> torch.Generator:
    """The step's generator on the compute device (same seed), so bulk draws (t, noise,
    label dropout) are made there with no host-to-device copy; on CPU it is ``gen``."""
    import torch

    if where.type == "cpu":
        return gen
    return torch.Generator(device=where).manual_seed(gen.initial_seed())


class Diffusion(Objective):
    """The class-conditional UNet, learning the configured forward process (its target, its
    distribution of t) under label dropout."""

    name, conditions_on_classes, draws_grids, export_kind = "unet", True, True, "UNet2DModel"

    def build(self, cfg: Config) -> torch.nn.Module:
        from ..core.models import build_unet

        return build_unet(cfg)

    def encodes_with_vae(self, cfg: Config, manifest: dict) -> bool:
        return cfg.vae.enabled and manifest["kind"] == "images"

    def loss(self, run, x0, labels, gen):
        import torch

        from ..core.losses import drop_labels
        from ..core.models import null_label

        cfg, n, gen = run.cfg, x0.shape[0], on_device(gen, x0.device)
        t = run.process.sample_time(n, gen)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device)
        labels = drop_labels(labels, cfg.diffusion.label_dropout, null_label(cfg),
                             torch.rand(n, generator=gen, device=gen.device))
        dtype = _dtype(cfg)

        def denoise(x, tt, y):
            return run.engine(x.to(dtype), tt, class_labels=y).sample

        per_sample = run.process.loss(denoise, x0.float(), labels, t, noise.float())
        return per_sample, run.process.noise_level(t)


class VAE(Objective):
    """The autoencoder the latent runs use: reconstruction + KL, and with
    ``vae.adversarial_weight`` a patch discriminator trained beside it (never exported)."""

    name, needs_image_shards, export_kind = "vae", True, "AutoencoderKL"

    def check(self, cfg: Config) -> None:
        from ..config import ConfigError

        if cfg.vae.adversarial_weight > 0 and cfg.runtime.zero_stage == 3:
            # the decoder's term runs the discriminator on detached whole parameters
            raise ConfigError(f"vae.adversarial_weight={cfg.vae.adversarial_weight:g} needs runtime.zero_stage 1 "
                              f"or 2: ZeRO-3 partitions the discriminator's parameters")

    def build(self, cfg: Config) -> torch.nn.Module:
        from ..core.models import build_vae
        from ..core.vae_loss import AdversarialAutoencoder, PatchDiscriminator

        vae = build_vae(cfg)
        if cfg.vae.adversarial_weight == 0:
            return vae
        return AdversarialAutoencoder(vae, PatchDiscriminator(cfg.data.image_channels, cfg.vae.discriminator_width))

    def exported(self, model):
        return getattr(model, "vae", model)

    def loss(self, run, x0, labels, gen):
        from ..core.vae_loss import vae_loss

        v, module = run.cfg.vae, run.engine.module
        return vae_loss(self.exported(module), x0.to(_dtype(run.cfg)), gen, v.kl_weight, v.recon_loss,
                        getattr(module, "discriminator", None), v.adversarial_weight), None

    def measure_export(self, model, cfg):
        """Latent statistics on the training images (written into the VAE's config, so its
        latents are unit-variance per channel) and the reconstruction PSNR."""
        from ..latents.calibrate import calibrate, image_batches, reconstruction_psnr
        from ..data import storage

        storage.configure(cfg.s3)
        model.eval()
        stats = calibrate(model, cfg.data.shards, cfg.vae.calibration_images, cfg.train.seed)
        judged_on = heldout_url(cfg.data.shards)
        quality = reconstruction_psnr(model, image_batches(judged_on, 1024, cfg.train.seed))
        return {"latent_stats": stats, "reconstruction": {**quality, "images": judged_on}}


class Classifier(Objective):
    """The domain classifier that judges class accuracy of samples."""

    name, needs_image_shards, conditions_on_classes, export_kind = "classifier", True, False, "DomainClassifier"

    def build(self, cfg: Config) -> torch.nn.Module:
        from ..core.models import build_classifier

        return build_classifier(cfg)

    def loss(self, run, x0, labels, gen):
        import torch

        logits = run.engine(x0.to(_dtype(run.cfg))).float()
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none"), None

    def measure_export(self, model, cfg):
        """Accuracy on the held-out split (on the training images when there is none)."""
        from ..latents.calibrate import classification_accuracy, image_batches
        from ..data import storage

        storage.configure(cfg.s3)
        judged_on = heldout_url(cfg.data.shards)
        accuracy = classification_accuracy(model.eval(), image_batches(judged_on, 10**9, cfg.train.seed,
                                                                        labels=True))
        return {"accuracy": {**accuracy, "images": judged_on, "held_out": judged_on != cfg.data.shards}}


def heldout_url(shards_url: str) -> str:
    """The held-out split prepare wrote beside ``shards_url`` (``data.holdout_fraction``),
    else ``shards_url`` itself."""
    from ..data.shards import load_manifest

    return load_manifest(shards_url).get("holdout", {}).get("url", shards_url)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (Diffusion(), VAE(), Classifier())}


def objective(cfg: Config) -> Objective:
    """The objective of ``train.target`` (validated by the config schema against these names)."""
    return OBJECTIVES[cfg.train.target]
