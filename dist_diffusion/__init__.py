"""dist_diffusion: latent diffusion training and evaluation on clusters."""

__version__ = "0.1.0"
