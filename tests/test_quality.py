"""What sample quality is judged against: latents normalised from the data, a held-out
split that stays put, and the real-against-real FID floor."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_one_line, make_class_folders, run_cli
from dist_diffusion.latents.calibrate import calibrate, image_batches, reconstruction_psnr
from dist_diffusion.config import load_config
from dist_diffusion.core.latent_stats import latent_affine, summary
from dist_diffusion.core.models import build_vae, decode_latents, encode_images
from dist_diffusion.data.prepare import Item, prepare, split_holdout

ROOT = Path(__file__).resolve().parents[1]
DATA = ["data.resolution=32", "data.samples_per_shard=20", "data.prepare_workers=1", "data.holdout_fraction=0.25"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """80 images of 4 classes as 32 px shards, a quarter held out."""
    root = tmp_path_factory.mktemp("quality")
    make_class_folders(root / "src", classes=4, per_class=20)
    cfg = load_config(ROOT / "configs/tiny.yaml", DATA)
    manifest = prepare(root / "src", str(root / "shards"), cfg.data, progress=False)
    return root, manifest


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_the_affine_follows_diffusers_conventions():
    sd = _Config(scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None)
    assert latent_affine(sd, 4) == ([0.0] * 4, [0.18215] * 4)
    flux_like = _Config(scaling_factor=0.5, shift_factor=0.1)
    assert latent_affine(flux_like, 2) == ([0.1, 0.1], [0.5, 0.5])
    per_channel = _Config(scaling_factor=1.0, latents_mean=[1.0, -2.0], latents_std=[2.0, 0.5])
    assert latent_affine(per_channel, 2) == ([1.0, -2.0], [0.5, 2.0])


def test_a_calibrated_vae_gives_unit_variance_latents_and_decodes_the_same(shards):
    root, _ = shards
    cfg = load_config(ROOT / "configs/tiny.yaml", DATA)
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.data).eval()
    images = torch.cat(list(image_batches(str(root / "shards"), 10_000)))
    with torch.no_grad():
        raw = summary(encode_images(vae, images, generator=torch.Generator().manual_seed(1)))
        before = decode_latents(vae, encode_images(vae, images[:4], sample=False))
    calibrate(vae, str(root / "shards"), num_images=10_000)
    with torch.no_grad():
        z = encode_images(vae, images, generator=torch.Generator().manual_seed(1))
        after = decode_latents(vae, encode_images(vae, images[:4], sample=False))
    stats = summary(z)
    assert abs(stats["std"] - 1) < 0.1 and all(abs(s - 1) < 0.1 for s in stats["channel_std"])
    assert all(abs(m) < 0.1 for m in stats["channel_mean"])
    assert any(abs(s - 1) > 0.1 for s in raw["channel_std"])  # the untrained VAE's raw scale was off
    assert torch.allclose(before, after, atol=1e-4)  # normalising is invertible: the decoder sees the same
    assert vae.config.latents_mean is not None and len(vae.config.latents_std) == cfg.vae.latent_channels


def test_encode_records_unit_variance_for_a_calibrated_vae(shards, tmp_path):
    from dist_diffusion.latents.encode import encode_dataset
    from dist_diffusion.runtime.env import ProcessEnv

    root, _ = shards
    cfg = load_config(ROOT / "configs/tiny.yaml", DATA)
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.data).eval()
    calibrate(vae, str(root / "shards"), num_images=10_000)
    vae.save_pretrained(tmp_path / "vae")
    cfg = load_config(ROOT / "configs/tiny.yaml", [*DATA, f"vae.pretrained={tmp_path / 'vae'}"])
    manifest = encode_dataset(cfg, str(root / "shards"), str(tmp_path / "latents"), ProcessEnv())
    stats = manifest["latent_stats"]
    assert abs(stats["std"] - 1) < 0.1 and all(abs(s - 1) < 0.1 for s in stats["channel_std"])
    assert manifest["latent_shift"] == pytest.approx(vae.config.latents_mean)


def test_the_holdout_split_is_disjoint_complete_and_stable(shards):
    root, manifest = shards
    held = json.loads((root / "shards/holdout/manifest.json").read_text())
    assert manifest["holdout"]["url"] == str(root / "shards/holdout") and held["holdout_of"] == str(root / "shards")
    assert manifest["num_samples"] + held["num_samples"] == 80 and 8 <= held["num_samples"] <= 32
    assert not _paths(root / "shards", manifest) & _paths(root / "shards/holdout", held)
    items = [Item(f"s{i}", f"c/{i}.png", 0) for i in range(200)]
    _, before = split_holdout(items, 0.25, 0)
    _, after = split_holdout(items[:150] + [Item("new", "c/new.png", 0)] + items[150:], 0.25, 0)
    assert {i.path for i in before} == {i.path for i in after} - {"c/new.png"}  # adding a file moves no other
    assert split_holdout(items, 0.25, 1)[1] != before  # the seed is the split's


def _paths(folder: Path, manifest: dict) -> set[str]:
    """The source paths of every sample of a shard set."""
    import tarfile

    found = set()
    for entry in manifest["shards"]:
        with tarfile.open(folder / entry["name"]) as tar:
            found |= {tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".path.txt")}
    return found


class _AreaCodec(torch.nn.Module):
    """A good reconstruction at a VAE's compression, with no learning: "encode" averages
    each f x f block (3 channels where the VAE keeps 4), "decode" upsamples bilinearly."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor, self.anchor = factor, torch.nn.Parameter(torch.zeros(()))  # device and dtype

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.nn.functional.avg_pool2d(x, self.factor)))

    def decode(self, z):
        return SimpleNamespace(sample=torch.nn.functional.interpolate(z, scale_factor=self.factor, mode="bilinear"))


def test_an_untrained_vae_reconstructs_held_out_images_badly(shards):
    """Badly against a good reference on the same images, measured the same way: block
    averages at the VAE's downsampling factor reconstruct these held-out images at about
    31 dB; the untrained VAE at about 11."""
    root, _ = shards
    cfg = load_config(ROOT / "configs/tiny.yaml", DATA)
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.data).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    held_out = str(root / "shards/holdout")
    with torch.no_grad():
        untrained = reconstruction_psnr(vae, image_batches(held_out, 64))
        good = reconstruction_psnr(_AreaCodec(factor), image_batches(held_out, 64))
    assert untrained["num_images"] == good["num_images"] > 0
    assert good["psnr_db"] > 25  # the reference is a good reconstruction
    assert untrained["psnr_db"] < good["psnr_db"] - 10 and untrained["mse"] > 10 * good["mse"], (untrained, good)


def test_calibrate_vae_writes_the_statistics_into_the_vae_directory(shards, tmp_path, capsys):
    from diffusers import AutoencoderKL

    root, manifest = shards
    torch.manual_seed(0)
    tiny = load_config(ROOT / "configs/tiny.yaml", DATA)
    build_vae(tiny.vae, tiny.data).save_pretrained(tmp_path / "sd-like")
    code, _ = run_cli(["calibrate-vae", "--vae", str(tmp_path / "sd-like"), "--shards", str(root / "shards"),
                       "--out", str(tmp_path / "calibrated")], capsys)
    assert code == 0
    assert AutoencoderKL.from_pretrained(tmp_path / "sd-like").config.latents_mean is None  # the source is kept
    calibrated = AutoencoderKL.from_pretrained(tmp_path / "calibrated")
    assert len(calibrated.config.latents_std) == 4 and calibrated.config.scaling_factor == 1.0
    record = json.loads((tmp_path / "calibrated/dist_diffusion.json").read_text())
    assert record["latent_stats"]["num_images"] == manifest["num_samples"] and record["reconstruction"]["psnr_db"] > 0
    assert_one_line(*run_cli(["calibrate-vae", "--vae", str(tmp_path / "nothing"), "--shards", str(root / "shards")],
                             capsys), 2, "no diffusers config.json")


class _MeanColour:
    """A stand-in extractor (pure logic): an image's mean colour and its spread."""
    id, dim, classes, judges_labels = "mean-colour", 6, 2, False

    def __call__(self, images):
        x = images.double() / 255
        feats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).numpy()
        return feats, feats[:, :2]


def test_the_floor_uses_real_images_outside_the_reference(shards, tmp_path):
    from dist_diffusion.evaluate.reference import floor_images, real_floor, reference_stats
    from dist_diffusion.runtime.env import ProcessEnv

    root, manifest = shards
    train, held = str(root / "shards"), str(root / "shards/holdout")
    assert floor_images(held) == (train, "training split")  # a held-out reference: real images it lacks
    assert floor_images(train) == (held, "held-out split")
    make_class_folders(tmp_path / "src", classes=2, per_class=10)
    plain = prepare(tmp_path / "src", str(tmp_path / "plain"), load_config(ROOT / "configs/tiny.yaml", [
        *DATA, "data.holdout_fraction=0"]).data, progress=False)
    assert "holdout" not in plain and floor_images(str(tmp_path / "plain"))[0] == str(tmp_path / "plain")

    reference, _ = reference_stats(held, _MeanColour(), ProcessEnv())
    floor = real_floor(reference, train, _MeanColour(), 40, ProcessEnv())
    assert floor["fid_real_floor_n"] == 40 and floor["fid_real_floor_images"] == train
    assert 0 < floor["fid_real_floor"]
    whole = real_floor(reference, train, _MeanColour(), 10_000, ProcessEnv())
    assert whole["fid_real_floor_n"] == manifest["num_samples"]  # N is capped by what there is
    assert whole["fid_real_floor"] < floor["fid_real_floor"]  # more images, less small-N bias


def test_the_textures_set_is_real_tiles_of_at_least_five_classes(tmp_path):
    import numpy as np
    from PIL import Image

    from dist_diffusion.demo.datasets import DATASETS, MAX_TILES

    textures = DATASETS["textures"]
    count = textures.write(tmp_path)
    classes = sorted(p.name for p in tmp_path.iterdir())
    assert len(classes) == textures.num_classes >= 5 and count > 200 * len(classes)
    for name in classes:
        tiles = sorted((tmp_path / name).iterdir())
        assert len(tiles) <= MAX_TILES and len({t.name for t in tiles}) == len(tiles)  # one tile per grid cell
        first = np.asarray(Image.open(tiles[0]))
        assert first.shape == (32, 32, 3) and first.std() > 0


@pytest.mark.parametrize("dataset", ["digits", "textures"])
def test_each_demo_recipe_trains_its_unet_on_the_latents_its_vae_makes(dataset, tmp_path):
    """The VAE run and the UNet run of a data set agree on the latent shape, and a recipe
    for latents larger than 8x8 shifts the schedule to match (diffusion.snr_shift)."""
    import argparse

    from dist_diffusion.config.shapes import unet_input_shape
    from dist_diffusion.demo.run import DemoRuns

    args = argparse.Namespace(nproc=2, dataset=dataset, vae_steps=None, overrides=[], classifier_steps=300,
                              eval_samples=500)
    runs = DemoRuns(tmp_path, args)
    vae, unet = load_config("configs/vae_tiny.yaml", runs.vae), load_config("configs/tiny.yaml", runs.unet)
    assert unet_input_shape(vae.vae, vae.data) == unet_input_shape(unet.vae, unet.data)
    assert unet.diffusion.snr_shift == unet_input_shape(unet.vae, unet.data)[1] / 8


def test_the_demo_bar_holds_samples_to_the_floor():
    from dist_diffusion.demo.run import quality_bar

    rows = [{"guidance_scale": 1.0, "fid_domain": 10.0, "class_accuracy": 0.7},
            {"guidance_scale": 3.0, "fid_domain": 9.0, "class_accuracy": 0.95}]
    report = {"results": rows, "fid_domain_untrained": 100.0, "fid_real_floor": 2.0, "accuracy_bar": 0.9}
    assert quality_bar(report)["passed"] is False  # 9 > 3 x 2
    assert quality_bar({**report, "fid_real_floor": 3.0})["passed"] is True
    assert quality_bar({**report, "fid_real_floor": 3.0, "accuracy_bar": 0.96})["passed"] is False


def test_adversarial_terms_train_each_player_only_on_its_own_loss():
    """One backward of the summed terms gives the discriminator exactly the gradient of its
    hinge loss (the decoded images detached) and the decoder exactly that of -w * D(x_hat)
    (the discriminator held fixed)."""
    from dist_diffusion.core.vae_loss import PatchDiscriminator, adversarial_terms

    torch.manual_seed(0)
    disc = PatchDiscriminator(3, 8)
    decoder_out = torch.nn.Parameter(torch.randn(2, 3, 16, 16))
    real = torch.randn(2, 3, 16, 16)
    adversarial_terms(disc, real, torch.tanh(decoder_out), weight=0.5).sum().backward()
    got_disc, got_decoder = [p.grad.clone() for p in disc.parameters()], decoder_out.grad.clone()

    disc.zero_grad()
    hinge = torch.relu(1 - disc(real)) + torch.relu(1 + disc(torch.tanh(decoder_out).detach()))
    hinge.flatten(1).mean(dim=1).sum().backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(got_disc, disc.parameters()))
    decoder_out.grad = None
    disc.requires_grad_(False)
    (-0.5 * disc(torch.tanh(decoder_out))).flatten(1).mean(dim=1).sum().backward()
    assert torch.allclose(got_decoder, decoder_out.grad, atol=1e-6) and got_decoder.abs().sum() > 0


def test_an_adversarial_vae_trains_its_discriminator_beside_it_and_exports_the_vae_alone():
    from diffusers import AutoencoderKL

    from dist_diffusion.core.vae_loss import AdversarialAutoencoder
    from dist_diffusion.train.objectives import objective

    adversarial = objective(load_config(ROOT / "configs/vae_tiny.yaml", ["vae.adversarial_weight=0.1"]))
    trained = adversarial.build()
    assert isinstance(trained, AdversarialAutoencoder)
    assert any(name.startswith("discriminator.") for name in trained.state_dict())
    assert isinstance(adversarial.exported(trained), AutoencoderKL)
    plain = load_config(ROOT / "configs/vae_tiny.yaml", ["vae.adversarial_weight=0"])
    assert isinstance(objective(plain).build(), AutoencoderKL)


def test_the_adversarial_pull_is_a_fixed_fraction_of_the_reconstructions():
    """However large the discriminator's logits grow, the decoder's adversarial gradient at
    the decoded image is `weight` times the reconstruction's (VQGAN's adaptive weight)."""
    from dist_diffusion.core.vae_loss import PatchDiscriminator, balanced_weight

    torch.manual_seed(0)
    disc = PatchDiscriminator(3, 8)
    decoded = torch.nn.Parameter(torch.randn(2, 3, 16, 16))
    target = torch.randn(2, 3, 16, 16)
    reconstruction = (decoded - target).abs().mean()
    for scale in (1.0, 1000.0):
        adversarial = -scale * disc(decoded).mean()
        weight = balanced_weight(reconstruction, adversarial, decoded, 0.5)
        g_rec, = torch.autograd.grad(reconstruction, decoded, retain_graph=True)
        g_adv, = torch.autograd.grad(weight * adversarial, decoded, retain_graph=True)
        assert not weight.requires_grad
        assert torch.allclose(g_adv.norm(), 0.5 * g_rec.norm(), rtol=1e-4)
