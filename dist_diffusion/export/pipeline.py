"""A diffusers pipeline for the class-conditional UNets trained here: classifier-free
guidance with the UNet's null class, then the VAE decode with the latent statistics the
VAE export carries (``latents_mean``/``latents_std`` in its config.json).

A UNet export is a pipeline directory (``model_index.json``, ``unet/``, ``scheduler/`` and,
in latent space, ``vae/``: the VAE it was trained on), so

    pipe = ClassConditionalLatentPipeline.from_pretrained("runs/demo/unet_model")
    images = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, num_inference_steps=50,
                  generator=torch.Generator().manual_seed(0)).images

A latent export whose VAE could not be copied in takes it as a component:
``from_pretrained(unet_export, vae=AutoencoderKL.from_pretrained(vae_export))``. A
pixel-space export (a ``DDIMPipeline`` directory) loads the same way and needs no VAE.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..core.latent_stats import denormalise, latent_affine

Generators = Optional[Union[torch.Generator, List[torch.Generator]]]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class ClassConditionalLatentPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance (Ho & Salimans 2022) from a
    ``UNet2DModel`` with ``num_class_embeds`` rows, the last of which (``null_class_label``)
    is the 'no class' label it was trained with. ``vae`` is None for a pixel-space UNet;
    ``latent_space`` (recorded in model_index.json) says whether the UNet needs one."""

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, vae: Optional[AutoencoderKL] = None,
                 null_class_label: Optional[int] = None, latent_space: Optional[bool] = None):
        super().__init__()
        rows = unet.config.num_class_embeds
        if not rows:
            raise ValueError("ClassConditionalLatentPipeline needs a class-conditional UNet2DModel "
                             "(num_class_embeds is not set in its config.json)")
        latent_space = vae is not None if latent_space is None else bool(latent_space)
        if latent_space and vae is None:
            raise ValueError("this UNet denoises VAE latents and no VAE came with it: pass the VAE it was trained "
                             "on, from_pretrained(unet_export, vae=AutoencoderKL.from_pretrained(vae_export))")
        if vae is not None and vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the UNet takes "
                             f"{unet.config.in_channels}: pass the VAE the UNet was trained on")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        null = rows - 1 if null_class_label is None else int(null_class_label)
        self.register_to_config(null_class_label=null, latent_space=latent_space)

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, Sequence[int], torch.Tensor], guidance_scale: float = 3.0,
                 num_inference_steps: int = 50, generator: Generators = None, eta: float = 0.0,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil", return_dict: bool = True):
        """Images of ``class_labels`` (one per label). ``guidance_scale`` s gives
        eps_u + s (eps_c - eps_u): 1 is the plain conditional model, 0 the unconditional
        one. ``generator``: one, or one per image (image i then draws only from
        generators[i], so it comes out the same in any batch). ``latents``: the initial
        noise (B, C, H, W) instead of drawing it. ``output_type``: "pil", "np" (B,H,W,C
        in [0, 1]), "pt" (B,C,H,W in [0, 1]) or "latent" (the sampler's output, before
        the decode)."""
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale} must be >= 0")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; choose one of {list(OUTPUT_TYPES)}")
        labels = self._labels(class_labels)
        x = self._initial_noise(len(labels), generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=x.device)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching: the noise as drawn
        extra = self._step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._guided(self._scaled(x, t), t, labels, float(guidance_scale))
            x = self.scheduler.step(out, t, x, **extra).prev_sample
        images = x if output_type == "latent" else self._to_output(self.decode(x), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (B,C,h,w) -> images in about [-1, 1]: raw = z * std / scaling_factor
        + mean per channel (latents_mean/latents_std; without them z / scaling_factor +
        shift_factor, as for an SD-VAE), then the VAE's decoder. Pixel space: the samples."""
        if self.vae is None:
            return latents
        shift, scale = latent_affine(self.vae.config, self.vae.config.latent_channels)
        raw = denormalise(latents.float(), shift, scale)
        return self.vae.decode(raw.to(self.vae.device, self.vae.dtype)).sample.float()

    def _labels(self, class_labels) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        null = self.config.null_class_label
        if labels.numel() == 0 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"class_labels must be one or more integer class indices, got {class_labels!r}")
        if labels.min() < 0 or labels.max() >= null:
            raise ValueError(f"class_labels must lie in [0, {null}) (this UNet's classes; {null} is its null "
                             f"class, which guidance uses), got {labels.tolist()}")
        return labels.long()

    def _initial_noise(self, batch: int, generator: Generators, latents: Optional[torch.Tensor]) -> torch.Tensor:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        shape = (batch, self.unet.config.in_channels, h, w)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents of shape {tuple(latents.shape)}; this UNet and {batch} labels need {shape}")
            return latents.to(self._execution_device, torch.float32)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} class labels: pass one, or one per label")
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)

    def _scaled(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's input scaling at t. Flow-matching schedulers (rectified flow's
        FlowMatchEulerDiscreteScheduler) have none: their x_t is the network's input as is."""
        scale = getattr(self.scheduler, "scale_model_input", None)
        return x if scale is None else scale(x, t)

    def _step_kwargs(self, generator: Generators, eta: float) -> dict:
        """eta and generator for the schedulers whose step takes them (DDIM, DDPM, ...)."""
        accepted = inspect.signature(self.scheduler.step).parameters
        extra = {"eta": eta} if "eta" in accepted else {}
        return {**extra, "generator": generator} if "generator" in accepted else extra

    def _guided(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided UNet output; conditional and null passes run as one batch of 2B. Scale 1
        (0) is the conditional (unconditional) output alone, as dist_diffusion's sampler does."""
        null = torch.full_like(labels, self.config.null_class_label)
        if scale == 1.0 or scale == 0.0:
            return self._unet(x, t, labels if scale == 1.0 else null)
        cond, uncond = self._unet(torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
        return uncond + scale * (cond - uncond)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to(self.unet.dtype), t, class_labels=labels).sample.float()

    def _to_output(self, images: torch.Tensor, output_type: str):
        images = (images / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
        if output_type == "pt":
            return images
        array = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)
