import json
from pathlib import Path

import pytest

from dist_diffusion.config import ConfigError, field_docs, load_config, to_yaml

ROOT_RECIPE = Path(__file__).resolve().parents[1] / "configs/tiny.yaml"

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_shortens(recipe):
    cfg = load_config(recipe, ["train.max_steps=20"])
    assert cfg.train.max_steps == 20
    assert cfg.model.block_out_channels and len(cfg.model.attention_levels) == len(cfg.model.block_out_channels)


def test_reference_recipe_matches_the_report():
    cfg = load_config(ROOT / "configs/imagenet100_latent.yaml")
    assert (cfg.data.resolution, cfg.train.batch_size, cfg.model.num_classes) == (128, 128, 100)
    assert cfg.diffusion.label_dropout == 0.1 and cfg.diffusion.schedule in ("linear", "scaled_linear")


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  max_stepz: 10\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: train\.max_stepz"):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="trainer"):
        load_config(write(tmp_path, "trainer:\n  max_steps: 10\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(write(tmp_path, "train:\n  max_steps: lots\n"))


def test_wrong_type_in_override_names_key():
    with pytest.raises(ConfigError, match=r"command-line override: train\.lr"):
        load_config(None, ["train.lr=fast"])


def test_out_of_range_names_key_and_bound():
    with pytest.raises(ConfigError, match=r"sample\.eta=1\.5 must be <= 1"):
        load_config(None, ["sample.eta=1.5"])
    with pytest.raises(ConfigError, match=r"diffusion\.label_dropout=-0\.1 must be >= 0"):
        load_config(None, ["diffusion.label_dropout=-0.1"])


@pytest.mark.parametrize("override,match", [
    ("diffusion.schedule=quadratic", r"diffusion\.schedule='quadratic' is not one of"),
    ("sample.steps=0", r"sample\.steps=0 must be >= 1"),
    ("sample.steps=2000", r"sample\.steps=2000 must be <= 1000 for sample\.sampler=ddim"),
    ("sample.sampler=unipc sample.steps=1000", r"sample\.steps=1000 must be <= 999 for sample\.sampler=unipc"),
    ("sample.guidance_interval=[100,1000]", r"guidance_interval=\[100, 1000\] must be \[lo, hi\]"),
    ("sample.guidance_interval=[500,100]", r"guidance_interval"),
    ("sample.sampler=euler", r"sample\.sampler='euler' is not one of"),
    ("model.preset=huge", r"model\.preset='huge' is not one of"),
    ("eval.guidance_scales=[1,-2]", r"eval\.guidance_scales=\[1\.0, -2\.0\]: every scale must be >= 0"),
    ("eval.steps=[10,0]", r"eval\.steps=\[10, 0\]: every step count must be in 1\.\.1000"),
    ("eval.steps=[5000]", r"eval\.steps=\[5000\]"),
    ("train.preempt_signals=[SIGTERM,SIGBOGUS]", r"train\.preempt_signals has \['SIGBOGUS'\]"),
    ("train.preempt_signals=[SIGKILL]", r"train\.preempt_signals has \['SIGKILL'\]"),
    ("model=5", r"command-line override: model must be a mapping of its keys"),
])
def test_bad_values_get_one_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override.split())


def test_empty_recipe_and_a_section_given_a_scalar_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.yaml is empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: train must be a mapping of its keys .* not \[1, 2\]"):
        load_config(write(tmp_path, "train: [1, 2]\n"))


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.max_steps"])


def test_missing_file_names_path():
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config("nope.yaml")


def test_yaml_syntax_error_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_presets_fill_only_empty_fields():
    cfg = load_config(None, ["model.preset=small", "model.layers_per_block=3"])
    assert cfg.model.block_out_channels == [64, 128, 128] and cfg.model.layers_per_block == 3


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["sample.guidance_scale=5"])
    path = write(tmp_path, to_yaml(cfg))
    assert load_config(path) == cfg


def test_every_field_has_a_doc():
    docs = field_docs()
    assert len(docs) > 40
    assert all(doc for _, doc in docs), [key for key, doc in docs if not doc]


@pytest.mark.parametrize("argv,match", [
    (["sample", "--config", "configs/tiny.yaml", "--nproc", "0"], "--nproc: 0 must be >= 1"),
    (["eval", "--config", "configs/tiny.yaml", "--nproc", "-1"], "--nproc: -1 must be >= 1"),
    (["train", "--config", "configs/tiny.yaml", "--nproc", "-1"], "--nproc: -1 must be >= 0"),
    (["encode", "--shards", "x", "--out", "y", "--nproc", "two"], "--nproc: 'two' is not a whole number"),
])
def test_a_process_count_that_means_nothing_is_refused(argv, match, capsys):
    from dist_diffusion.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and match in capsys.readouterr().err


def test_sampler_sweep_pins_steps_per_entry_and_walks_ddpm_once():
    from dist_diffusion.evaluate.sample import sweep

    cfg = load_config(ROOT_RECIPE, ["eval.samplers=[ddim:50,ddim:100,ddpm,ddpm:20,unipc:10,dpm_solver_2m]",
                                    "eval.steps=[20]", "eval.guidance_scales=[1,3]"])
    points = [(p.sampler, p.steps, p.guidance_scale) for p in sweep(cfg.sample, cfg.eval, cfg.diffusion.num_train_timesteps)]
    assert points == [("ddim", 50, 1.0), ("ddim", 50, 3.0), ("ddim", 100, 1.0), ("ddim", 100, 3.0),
                      ("ddpm", 1000, 1.0), ("ddpm", 1000, 3.0), ("unipc", 10, 1.0), ("unipc", 10, 3.0),
                      ("dpm_solver_2m", 20, 1.0), ("dpm_solver_2m", 20, 3.0)]
    # the configured sampler keeps the names of a plain sweep; the others carry theirs
    assert [p.name for p in sweep(cfg.sample, cfg.eval, cfg.diffusion.num_train_timesteps)][:2] == ["cfg1_steps50", "cfg3_steps50"]
    assert sweep(cfg.sample, cfg.eval, cfg.diffusion.num_train_timesteps)[4].name == "ddpm_cfg1_steps1000"
    plain = load_config(ROOT_RECIPE, ["eval.steps=[10,20]", "eval.guidance_scales=[3]"])
    assert [p.name for p in sweep(plain.sample, plain.eval, plain.diffusion.num_train_timesteps)] == ["cfg3_steps10", "cfg3_steps20"]


def test_a_validated_config_is_frozen_and_derive_makes_a_validated_copy():
    import dataclasses

    from dist_diffusion.config import derive

    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.max_steps=3"])
    with pytest.raises(dataclasses.FrozenInstanceError, match="derive"):
        cfg.train.max_steps = 5
    moved = derive(cfg, {"train.run_dir": "/abs/run", "train.preempt_signals": []})
    assert (moved.train.run_dir, moved.train.preempt_signals, moved.train.max_steps) == ("/abs/run", [], 3)
    assert cfg.train.run_dir == "runs/tiny"
    with pytest.raises(dataclasses.FrozenInstanceError):
        moved.sample.steps = 1
    with pytest.raises(ConfigError, match="train.max_steps=0 must be >= 1"):
        derive(cfg, {"train.max_steps": 0})
    with pytest.raises(ConfigError, match="train.max_stepz is not a config key"):
        derive(cfg, {"train.max_stepz": 1})


@pytest.mark.parametrize("old,new", [("sample.cfg_scale=2", "sample.guidance_scale"),
                                     ("eval.cfg_scales=[1,3]", "eval.guidance_scales")])
def test_a_renamed_key_names_its_new_name(old, new):
    with pytest.raises(ConfigError, match=f"was renamed {new}"):
        load_config(ROOT / "configs/tiny.yaml", [old])


def test_a_pretrained_vae_sets_the_latent_shape_whatever_the_recipe_says(tmp_path):
    """A 2-level VAE (32 px -> 16x16) under a recipe written for 3 levels (8x8): the UNet,
    the sampler and eval all take the VAE's shape, read from its config.json."""
    from dist_diffusion.config.shapes import unet_input_shape

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4,
                                                      "block_out_channels": [32, 64]}))
    recipe = load_config("configs/tiny.yaml")
    assert unet_input_shape(recipe.vae, recipe.data) == (4, 8, 8)
    pointed = load_config("configs/tiny.yaml", [f"vae.pretrained={tmp_path}"])
    assert unet_input_shape(pointed.vae, pointed.data) == (4, 16, 16)
