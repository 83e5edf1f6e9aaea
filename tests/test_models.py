import torch

from dist_diffusion.config import load_config, unet_input_shape
from dist_diffusion.core.ema import ema_decay, ema_update_
from dist_diffusion.core.losses import diffusion_loss
from dist_diffusion.core.models import (as_denoiser, build_unet, build_vae, count_parameters,
                                        decode_latents, encode_images)
from dist_diffusion.core.schedule import make_schedule


def test_unet_presets_have_the_documented_sizes():
    base = load_config("configs/imagenet100_latent.yaml")
    assert 30e6 < count_parameters(build_unet(base.model, unet_input_shape(base.vae, base.data))) < 40e6  # the report's ~35M UNet
    tiny = load_config("configs/tiny.yaml")
    assert count_parameters(build_unet(tiny.model, unet_input_shape(tiny.vae, tiny.data))) < 2e6


def test_unet_has_a_null_class_row():
    cfg = load_config(None, ["model.num_classes=7"])
    unet = build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data))
    assert unet.class_embedding.num_embeddings == 8
    x = torch.randn(2, *unet_input_shape(cfg.vae, cfg.data))
    out = as_denoiser(unet)(x, torch.tensor([3, 900]), torch.tensor([0, 7]))
    assert out.shape == x.shape


def test_tiny_unet_overfits_one_batch():
    cfg = load_config(None, ["vae.enabled=false", "data.resolution=16", "model.num_classes=4"])
    torch.manual_seed(0)
    unet = build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data))
    model, sched = as_denoiser(unet), make_schedule("linear")
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    labels, t = torch.arange(8) % 4, torch.linspace(50, 950, 8).long()
    noise = torch.randn_like(x0)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = diffusion_loss(model, sched, x0, labels, t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_vae_shapes_and_scale_factor():
    cfg = load_config("configs/tiny.yaml", ["vae.scaling_factor=0.5"])
    vae = build_vae(cfg.vae, cfg.data).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = encode_images(vae, images, sample=False)
        mean = vae.encode(images).latent_dist.mean
        out = decode_latents(vae, z)
    assert z.shape == (2, 4, 8, 8) == (2, *unet_input_shape(cfg.vae, cfg.data))
    assert torch.allclose(z, 0.5 * mean)
    assert out.shape == images.shape


def test_vae_round_trips_through_save_pretrained(tmp_path):
    """Saved and loaded through vae.pretrained: the same config and every weight bitwise."""
    cfg = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.data)
    vae.save_pretrained(tmp_path / "vae")
    torch.manual_seed(1)  # a loader that built a fresh VAE instead would get other weights
    pointed = load_config("configs/tiny.yaml", [f"vae.pretrained={tmp_path / 'vae'}"])
    loaded = build_vae(pointed.vae, pointed.data)
    def public(config):  # JSON turns tuples into lists; _name_or_path and the like are the loader's
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}
    assert loaded.config.latent_channels == 4 and public(loaded.config) == public(vae.config)
    saved, got = vae.state_dict(), loaded.state_dict()
    assert list(got) == list(saved)
    assert all(got[k].dtype == saved[k].dtype and torch.equal(got[k], saved[k]) for k in saved)
    fresh = build_vae(cfg.vae, cfg.data).state_dict()  # the comparison can fail: a fresh VAE differs
    assert not all(torch.equal(fresh[k], saved[k]) for k in saved)


def test_missing_pretrained_vae_is_a_clear_error(tmp_path):
    import pytest
    from dist_diffusion.config import ConfigError
    with pytest.raises(ConfigError, match="no diffusers config.json"):
        pointed = load_config("configs/tiny.yaml", [f"vae.pretrained={tmp_path}"])
        build_vae(pointed.vae, pointed.data)


def test_ema_math():
    assert ema_decay(0, 0.999, warmup=True) == 0.1
    assert ema_decay(10_000, 0.999, warmup=True) == 0.999
    assert abs(ema_decay(10_000, half_life_steps=100, warmup=False) ** 100 - 0.5) < 1e-12
    ema, cur = [torch.zeros(3)], [torch.ones(3, dtype=torch.bfloat16)]
    ema_update_(ema, cur, 0.9)
    assert ema[0].dtype == torch.float32 and torch.allclose(ema[0], torch.full((3,), 0.1))
