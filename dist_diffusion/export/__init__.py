"""`dist-diffusion export`: a run's latest complete checkpoint -> a diffusers directory.

- ``writer``: the EMA (or raw) weights as a UNet2DModel / AutoencoderKL directory, with
  its scheduler, a pipeline index and what the run measured;
- ``posthoc``: post-hoc EMA (``dist-diffusion ema-reconstruct``): the EMA of any relative
  length from the run's profile snapshots, partition by partition, as such a directory;
- ``pipeline``: ``ClassConditionalLatentPipeline``, which samples such a directory with
  classifier-free guidance and decodes it with the latent statistics applied.
"""

from .writer import ddim_scheduler, export_ema_files, export_model, write_export

__all__ = ["ddim_scheduler", "export_ema_files", "export_model", "write_export"]
