"""The demo and the ablation: the whole product on the embedded stack, on real images.

- ``run``: `python -m dist_diffusion.demo` (`make demo`): data -> S3 -> classifier, VAE,
  latent UNet -> evaluation -> report, held to a quality bar;
- ``datasets``: its real image sets (scikit-learn's digits, scikit-image's textures);
- ``ablation``: `python -m dist_diffusion.demo.ablation` (`make ablation`): the seed
  report's comparison on the digits, one table.
"""
