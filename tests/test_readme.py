"""Every README code block that samples or decodes runs as printed: each is marked
``<!-- tested: NAME -->`` and executed unchanged, in a directory where the paths it names
(``runs/demo/unet_model``, ``runs/demo/vae_model``, ``runs/pixel/unet_model``) are exports
laid out as ``dist-diffusion export`` writes them. Its output must be what our own sampler
and decode give for the same noise."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from dist_diffusion.config import load_config, unet_input_shape
from dist_diffusion.core.guidance import Guidance
from dist_diffusion.core.models import as_denoiser, build_unet, decode_latents
from dist_diffusion.core.samplers import run_sampler
from dist_diffusion.core.schedule import forward_process
from dist_diffusion.export import write_export
from dist_diffusion.imaging import to_uint8
from test_pipeline import vae_export

ROOT = Path(__file__).resolve().parents[1]
README, RECIPE = ROOT / "README.md", ROOT / "configs/tiny.yaml"
MARKED = re.compile(r"<!-- tested: ([\w-]+) -->\n```python\n(.*?)```", re.S)
PYTHON = re.compile(r"(?:<!-- tested: [\w-]+ -->\n)?```python\n(.*?)```", re.S)
SAMPLES_OR_DECODES = ("from_pretrained", ".decode(", "pipe(", "scheduler.step")
# the digits' recipe (configs/tiny.yaml: 32 px <-> 8x8x4 latents, 10 classes) with a smaller
# UNet, so that the blocks' 50-step samplers run in seconds
SMALL = ["model.block_out_channels=[8,16]", "model.attention_levels=[false,false]", "model.norm_num_groups=4"]
LATENT, PIXEL = SMALL, [*SMALL, "vae.enabled=false"]


def marked_blocks() -> dict[str, str]:
    return {name: code for name, code in MARKED.findall(README.read_text())}


def test_every_block_that_samples_or_decodes_is_tested():
    text = README.read_text()
    unmarked = [m.group(1)[:80] for m in PYTHON.finditer(text)
                if not m.group(0).startswith("<!--") and any(s in m.group(1) for s in SAMPLES_OR_DECODES)]
    assert unmarked == [], "mark these README blocks <!-- tested: NAME --> and check them here"
    assert sorted(marked_blocks()) == sorted(CHECKS)


@pytest.fixture(scope="module")
def printed_paths(tmp_path_factory):
    """A directory holding the exports at the README's relative paths."""
    root = tmp_path_factory.mktemp("readme")
    (root / "runs/demo").mkdir(parents=True)
    vae_dir = vae_export(root / "runs/demo/vae_model")
    for path, overrides in (("runs/demo/unet_model", [*LATENT, f"vae.pretrained={vae_dir}"]),
                            ("runs/pixel/unet_model", PIXEL)):
        cfg = load_config(RECIPE, overrides)
        torch.manual_seed(0)
        write_export(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval(), cfg, root / path, {"weights": "random"})
    return root


def run_as_printed(name: str, where: Path, monkeypatch) -> dict:
    """The block's globals after exec of its exact text in ``where``, global RNG seeded 0."""
    monkeypatch.chdir(where)
    torch.manual_seed(0)
    grad = torch.is_grad_enabled()
    namespace = {"__name__": "__readme__"}
    try:
        exec(compile(marked_blocks()[name], f"README.md <!-- tested: {name} -->", "exec"), namespace)
    finally:
        torch.set_grad_enabled(grad)
    return namespace


@torch.no_grad()
def ours(root: Path, noise: torch.Tensor, labels, scale: float = 3.0, steps: int = 50) -> torch.Tensor:
    """Our DDIM + CFG from ``noise`` on the README's export, decoded as ``eval`` decodes: [0, 1]."""
    latent = noise.shape[1] == 4
    path = root / ("runs/demo/unet_model" if latent else "runs/pixel/unet_model")
    cfg = load_config(RECIPE, [*LATENT, f"vae.pretrained={root / 'runs/demo/vae_model'}"]
                      if latent else PIXEL)
    unet = UNet2DModel.from_pretrained(path).eval()
    x = run_sampler("ddim", as_denoiser(unet), forward_process(cfg.diffusion), noise, torch.as_tensor(labels),
                    Guidance(cfg.model.num_classes, scale), steps=steps, spacing=cfg.sample.spacing,
                    prediction=cfg.diffusion.prediction, clip_x0=cfg.sample.clip_x0)
    if latent:
        x = decode_latents(AutoencoderKL.from_pretrained(root / "runs/demo/vae_model").eval(), x)
    return (x.clamp(-1, 1) + 1) / 2


def check_latent_pipeline(ns, root):
    images = ns["images"]
    assert len(images) == 10 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    assert (root / "three.png").is_file()
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(10)])
    expect = to_uint8(ours(root, noise, list(range(10))) * 2 - 1).permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(np.stack([np.asarray(im) for im in images]).astype(int) - expect).max() <= 1


def check_latent_pipeline_pair(ns, root):
    images = ns["images"]
    assert isinstance(images, np.ndarray) and images.shape == (3, 32, 32, 3)
    torch.manual_seed(0)  # the pipeline drew its noise from the global generator, seeded 0
    expect = ours(root, torch.randn(3, 4, 8, 8), [7, 7, 7]).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - expect).max() <= 1e-5


def check_pixel_loop(ns, root):
    images = ns["images"]
    assert images.shape == (8, 3, 32, 32)
    torch.manual_seed(0)
    assert (images - ours(root, torch.randn(8, 3, 32, 32), torch.arange(8) % 10)).abs().max().item() <= 1e-5


def check_latent_loop(ns, root):
    images, vae = ns["images"], ns["vae"]
    assert images.shape == (8, 3, 32, 32)
    torch.manual_seed(0)
    expect = ours(root, torch.randn(8, 4, 8, 8), torch.arange(8) % 10)
    assert (images - expect).abs().max().item() <= 1e-5
    with torch.no_grad():  # the recipe it replaced, which skipped the latent statistics
        old = (vae.decode(ns["x"] / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    assert (old - expect).abs().max().item() > 0.05


CHECKS = {"latent-pipeline": check_latent_pipeline, "latent-pipeline-pair": check_latent_pipeline_pair,
          "pixel-loop": check_pixel_loop, "latent-loop": check_latent_loop}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_readme_block_runs_as_printed(name, printed_paths, monkeypatch):
    CHECKS[name](run_as_printed(name, printed_paths, monkeypatch), printed_paths)
