"""The forward-process seam: DDPM through it gives, to the bit, what the functions it wraps
give (and the golden numbers recorded from the code before the seam); every registered
process and sampler resolves, and the config's choices are the registry's names."""

import pytest
import torch

from dist_diffusion.config import DiffusionConfig, SampleConfig, load_config, unet_input_shape
from dist_diffusion.config.registry import PROCESSES, SAMPLERS
from dist_diffusion.core.generate import generate
from dist_diffusion.core.guidance import Guidance
from dist_diffusion.core.losses import diffusion_loss
from dist_diffusion.core.models import as_denoiser, build_unet
from dist_diffusion.core.processes import VariancePreserving, implementation, make_process
from dist_diffusion.core.samplers import (MULTISTEP, ddim_sample, ddpm_sample, dpm_solver_2m_sample,
                                          per_sample_randn, sample_generators, unipc_sample)
from dist_diffusion.core.schedule import add_noise, make_schedule, make_timesteps, split_prediction, v_target

CASES = {"linear": ["diffusion.schedule=linear", "diffusion.prediction=epsilon"],
         "cosine": ["diffusion.schedule=cosine", "diffusion.prediction=v", "diffusion.snr_shift=2",
                    "diffusion.min_snr_gamma=5"],
         "scaled_linear": ["diffusion.schedule=scaled_linear", "diffusion.prediction=v"]}
BASE = ["vae.enabled=false", "data.resolution=16", "model.num_classes=3", "diffusion.num_train_timesteps=100"]
RUNS = {"ddpm": 100, "ddim": 10, "dpm_solver_2m": 8, "unipc": 6}

# sum and absolute sum of generate's output (2 samples, 16 px, CFG 2.5; ddim with eta 0.5),
# and the per-sample training loss, printed by the code before the seam (commit 4e6dd1d)
GOLDEN = {
    "linear": {"ddpm": (222.52140512131155, 2963.522743333131), "ddim": (151.0057376397308, 2055.824717630865),
               "dpm_solver_2m": (133.8064609890571, 1877.6074003028916),
               "unipc": (115.06776038346288, 1808.4925134567457),
               "loss": [0.9894866943359375, 0.9890018105506897, 1.1317214965820312, 1.091262936592102]},
    "cosine": {"ddpm": (258.5737123787403, 1790.2669451469555), "ddim": (226.91966147255152, 1458.774098883383),
               "dpm_solver_2m": (224.90497795399278, 1455.9141368763521),
               "unipc": (189.61129677668214, 1396.865361597389),
               "loss": [0.0125447241589427, 0.7564642429351807, 0.10963885486125946, 6.501971938632778e-08]},
    "scaled_linear": {"ddpm": (138.80200569087174, 1481.8936899652472),
                      "ddim": (90.99772878189106, 1247.1765316025121),
                      "dpm_solver_2m": (78.1785677196458, 1235.6661714585498),
                      "unipc": (65.7315191924572, 1230.6907858587801),
                      "loss": [0.9930577874183655, 0.9999505877494812, 1.1631726026535034, 1.1359002590179443]},
}


def case_config(case, sampler="ddim"):
    extra = ["sample.eta=0.5"] if sampler == "ddim" else []
    return load_config(None, BASE + CASES[case] + [f"sample.sampler={sampler}", f"sample.steps={RUNS[sampler]}",
                                                  "sample.guidance_scale=2.5", *extra])


def tiny_unet(cfg):
    torch.manual_seed(0)
    return build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).eval()


def direct(cfg, unet, labels, indices):
    """The sampler math functions called as generate called them before the seam."""
    s, d = cfg.sample, cfg.diffusion
    gens = sample_generators(s.seed, indices)
    noise = per_sample_randn(gens, (3, 16, 16))
    schedule, model = make_schedule(d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end, d.snr_shift), \
        as_denoiser(unet)
    g, common = Guidance(cfg.model.num_classes, s.guidance_scale), dict(prediction=d.prediction, clip_x0=s.clip_x0)
    if s.sampler == "ddpm":
        return ddpm_sample(model, schedule, noise, labels, g, gens, **common)
    ts = make_timesteps(d.num_train_timesteps, s.steps, s.spacing, multistep=s.sampler in MULTISTEP)
    if s.sampler == "ddim":
        return ddim_sample(model, schedule, ts, noise, labels, g, eta=s.eta, generators=gens, **common)
    if s.sampler == "unipc":
        return unipc_sample(model, schedule, ts, noise, labels, g, order=s.order, **common)
    return dpm_solver_2m_sample(model, schedule, ts, noise, labels, g, **common)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sampler", list(RUNS))
def test_ddpm_generation_through_the_seam_is_bitwise_the_old_math_and_golden(case, sampler):
    cfg = case_config(case, sampler)
    unet, labels = tiny_unet(cfg), torch.tensor([0, 2])
    ours = generate(cfg.sample, cfg.diffusion, unet, labels, [3, 5])
    assert torch.equal(ours, direct(cfg, unet, labels, [3, 5]))
    total, absolute = GOLDEN[case][sampler]
    assert ours.double().sum().item() == pytest.approx(total, rel=1e-4)
    assert ours.double().abs().sum().item() == pytest.approx(absolute, rel=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_ddpm_loss_and_parts_through_the_seam_are_bitwise_the_old_functions(case):
    cfg = case_config(case)
    d, unet = cfg.diffusion, tiny_unet(cfg)
    process, schedule = make_process(d), make_schedule(d.schedule, d.num_train_timesteps, snr_shift=d.snr_shift)
    assert isinstance(process, VariancePreserving) and torch.equal(process.schedule.alphas_cumprod,
                                                                   schedule.alphas_cumprod)
    torch.manual_seed(1)
    x0, noise = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    t, y = torch.tensor([0, 17, 63, 99]), torch.tensor([0, 1, 2, 3])
    loss = process.loss(as_denoiser(unet), x0, y, t, noise)
    assert torch.equal(loss, diffusion_loss(as_denoiser(unet), schedule, x0, y, t, noise, d.prediction,
                                            d.min_snr_gamma))
    assert loss.tolist() == pytest.approx(GOLDEN[case]["loss"], rel=1e-4)
    x_t = add_noise(schedule, x0, noise, t)
    assert torch.equal(process.noised(x0, noise, t), x_t)
    assert torch.equal(process.target(x0, noise, t), noise if d.prediction == "epsilon" else
                       v_target(schedule, x0, noise, t))
    out = torch.randn_like(x0)
    theirs = split_prediction(d.prediction, out, x_t, schedule.alpha_bar(t))
    assert all(torch.equal(a, b) for a, b in zip(process.split(out, x_t, t), theirs))
    # the training draw of t: the same call on the step's generator as before the seam
    assert torch.equal(process.sample_time(64, torch.Generator().manual_seed(3)),
                       torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(3)))


def test_noise_level_quarters_are_the_timestep_quarters():
    process = make_process(DiffusionConfig(num_train_timesteps=1000))
    t = torch.arange(1000)
    assert torch.equal((process.noise_level(t) * 4).floor().long().clamp(max=3), (t * 4 // 1000).clamp(max=3))


def test_every_registered_process_and_sampler_resolves():
    for entry in PROCESSES.values():
        cls = implementation(entry.implementation)
        assert cls.name == entry.name
    for entry in SAMPLERS.values():
        assert callable(implementation(entry.implementation)) and entry.process in PROCESSES


def test_the_configs_choices_are_the_registrys_names():
    from dist_diffusion.config import field_docs

    fields = DiffusionConfig.__dataclass_fields__, SampleConfig.__dataclass_fields__
    assert fields[0]["process"].metadata["choices"] == list(PROCESSES)
    assert fields[1]["sampler"].metadata["choices"] == list(SAMPLERS)
    docs = dict(field_docs())
    assert all(name in docs["sample.sampler"] for name in SAMPLERS)


def test_the_ddpm_export_record_and_scheduler():
    cfg = load_config(None, ["diffusion.schedule=cosine", "diffusion.prediction=v", "sample.spacing=trailing"])
    process = make_process(cfg.diffusion)
    assert process.export_record() == {"process": "ddpm", "prediction": "v", "schedule": "cosine",
                                       "num_train_timesteps": 1000, "snr_shift": 1.0}
    scheduler = process.diffusers_scheduler(cfg.sample)
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.timestep_spacing == "trailing"
    assert torch.equal(scheduler.alphas_cumprod, process.schedule.alphas_cumprod)


def test_sampler_names_are_written_in_the_registry_alone():
    """No comparison with a sampler's name and no list of names outside config/registry.py: a
    new sampler is its function and one registry entry, not an edit in the config, the
    sweep, the report and generate. (A default or a table row may name one.)"""
    import ast
    from pathlib import Path

    package, names = Path(__file__).resolve().parents[1] / "dist_diffusion", set(SAMPLERS)

    def named(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    offenders = []
    for path in package.rglob("*.py"):
        if path == package / "config/registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            listed = isinstance(node, (ast.Tuple, ast.List, ast.Set)) and sum(map(named, node.elts)) > 1
            keyed = isinstance(node, ast.Dict) and any(named(k) for k in node.keys)
            compared = isinstance(node, ast.Compare) and any(map(named, (node.left, *node.comparators)))
            if listed or keyed or compared:
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []
