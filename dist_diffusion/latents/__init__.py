"""Latents: image shards -> VAE latent shards (``encode``), and a VAE's latent statistics
and reconstruction quality (``calibrate``). The latent shape a config implies lives with
the config (``config.shapes``), since the config's own rules need it."""
