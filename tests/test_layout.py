"""The layout rules of the design doc, checked: model math never imports the runtime,
and the CLI answers with one clear line on bad input."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("torch.distributed", "deepspeed", "ray", "boto3", "botocore", "submitit")


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_core_never_imports_the_distributed_runtime():
    offenders = [(p.name, m) for p in (ROOT / "dist_diffusion/core").glob("*.py")
                 for m in imported_modules(p)
                 if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_CORE)]
    assert offenders == []


def test_only_runtime_imports_torch_distributed_or_deepspeed():
    package = ROOT / "dist_diffusion"
    offenders = [(str(p.relative_to(package)), m) for p in package.rglob("*.py")
                 if p.parent.name != "runtime"
                 for m in imported_modules(p)
                 if m.startswith(("torch.distributed", "deepspeed"))]
    assert offenders == []


def test_data_never_imports_the_runtime():
    offenders = [(p.name, m) for p in (ROOT / "dist_diffusion/data").glob("*.py") for m in imported_modules(p)
                 if "runtime" in m.split(".")]
    relative = [(p.name, node.module) for p in (ROOT / "dist_diffusion/data").glob("*.py")
                for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level and "runtime" in (node.module or "").split(".")]
    assert offenders == [] and relative == []


def test_only_the_objective_registry_names_train_targets():
    """No `train.target == ...` switch outside dist_diffusion/train/objectives.py: a new objective
    is one class there, not an edit in the loop, the logger, export and the CLI."""
    offenders = []
    for path in (ROOT / "dist_diffusion").rglob("*.py"):
        if path.name == "objectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(side, ast.Attribute) and side.attr == "target"
                    for side in (node.left, *node.comparators)):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_what_a_launcher_imports_before_any_rank_is_torch_free():
    """The preflight, the preemption protocol and the one-line errors are imported by the
    launchers' parent process, which never trains: torch (seconds per import) stays out."""
    probe = ("import sys, dist_diffusion.train.checks, dist_diffusion.train as t, dist_diffusion.errors as e; "
             "t.Preempted, t.REQUEUE_EXIT_CODE, e.expected(); "
             "print(sorted(m for m in ('torch', 'diffusers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_training_package_names_resolve():
    from dist_diffusion import train

    assert callable(train.train) and callable(train.train_step) and issubclass(train.TrainingStopped, RuntimeError)
    with pytest.raises(AttributeError):
        train.no_such_name


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dist_diffusion.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_lists_only_real_subcommands(capsys):
    """`--help` lists exactly the subcommands the README documents (as `dist-diffusion
    NAME`), each once, and each it lists is real: its own --help runs and names it."""
    from dist_diffusion import cli

    out = run_cli("--help")
    assert out.returncode == 0
    block = out.stdout.split("positional arguments:")[1].split("options:")[0]
    listed = re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", block, re.M)
    documented = set(re.findall(r"dist-diffusion ([a-z][a-z-]*)", (ROOT / "README.md").read_text()))
    assert len(listed) == len(set(listed)) and set(listed) == documented, (listed, documented)
    for command in listed:
        assert exit_code(cli.main, [command, "--help"]) == 0, command
        assert capsys.readouterr().out.startswith(f"usage: dist-diffusion {command} "), command


def entry_points():
    """Every program a user starts, as a main(argv) callable."""
    import importlib.util

    from dist_diffusion import cli
    from dist_diffusion.demo import ablation, run as demo
    from dist_diffusion.train import __main__ as train

    mains = {"dist-diffusion": cli.main, "python -m dist_diffusion.train": train.main,
             "python -m dist_diffusion.demo": demo.main, "python -m dist_diffusion.demo.ablation": ablation.main}
    for name in ("ray_train", "ray_sample", "submitit_slurm"):
        spec = importlib.util.spec_from_file_location(name, ROOT / "launchers" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        mains[f"launchers/{name}.py"] = module.main
    return mains


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code or 0


def test_every_entry_point_has_a_clean_help_and_a_version(capsys):
    for name, main in entry_points().items():
        assert exit_code(main, ["--help"]) == 0, name
        out = capsys.readouterr()
        assert "usage:" in out.out and "Traceback" not in out.err, name
    from dist_diffusion import __version__, cli
    assert exit_code(cli.main, ["--version"]) == 0 and capsys.readouterr().out.strip() == f"dist-diffusion {__version__}"


@pytest.mark.parametrize("argv", [["configs/tiny.yaml", "train.max_stepz=1"],
                                  ["--config", "configs/tiny.yaml", "train.max_stepz=1"],
                                  ["train.max_steps=1"], ["configs/tiny.yaml", "configs/vae_tiny.yaml"]])
def test_a_rank_entry_point_takes_the_recipe_either_way_and_errs_in_one_line(argv, capsys):
    """torchrun's entry: positional or --config; a bad key, no recipe or two recipes is one line."""
    from dist_diffusion.train import __main__ as train

    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    if "train.max_stepz=1" in argv:
        assert "train.max_stepz" in err


def test_cli_config_prints_resolved_tree():
    out = run_cli("config", "configs/tiny.yaml", "train.max_steps=20")
    assert out.returncode == 0 and "max_steps: 20" in out.stdout


def test_cli_bad_key_is_one_line_not_a_traceback():
    out = run_cli("config", "configs/tiny.yaml", "train.max_stepz=20")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "train.max_stepz" in out.stderr


def test_a_rank_started_as_torchrun_starts_it_runs_the_objectives_own_checks(tmp_path):
    """torchrun gives each rank RANK/WORLD_SIZE and starts `python -m dist_diffusion.train`
    with no launcher's preflight before it: the rank itself must refuse what a launcher
    refuses, here the VAE's adversarial loss under ZeRO-3, before it waits for its peers."""
    from dist_diffusion.runtime.env import free_ports

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0])}
    out = subprocess.run([sys.executable, "-m", "dist_diffusion.train", "configs/vae_tiny.yaml",
                          f"train.run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'shards'}",
                          "vae.adversarial_weight=0.1", "runtime.zero_stage=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "Traceback" not in out.stderr
    assert "vae.adversarial_weight=0.1 needs runtime.zero_stage 1 or 2" in out.stderr


# ---- the house: one-way imports, a root that shows the layers ----

def package_modules() -> dict[str, Path]:
    """dist_diffusion's modules by dotted name (a package by its own name, for __init__)."""
    modules = {}
    for path in (ROOT / "dist_diffusion").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its body, functions included:
    ``from X import y`` counts as X.y when that is a module, else as X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_cycles() -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm)."""
    modules = package_modules()
    graph = {name: import_edges(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_the_package_has_no_import_cycle():
    """Module-level imports and imports inside functions alike: a function-level import
    hides a cycle from the interpreter, not from the next maintainer."""
    assert import_cycles() == []


def test_import_cycles_are_found():
    """The detector itself, on a cycle made for it: a layout test that cannot fail checks nothing."""
    modules = {"p.a": Path("a.py"), "p.b": Path("b.py")}
    edges = {"p.a": "from .b import x\n", "p.b": "def f():\n    from . import a\n"}
    original = Path.read_text
    try:
        Path.read_text = lambda self, *args, **kwargs: edges["p." + self.stem]
        assert import_edges("p.a", Path("a.py"), modules) == {"p.b"}
        assert import_edges("p.b", Path("b.py"), modules) == {"p.a"}
    finally:
        Path.read_text = original


ROOT_MODULES_MAX = 6


def test_the_package_root_holds_at_most_six_modules():
    """Everything else lives in a package named for what it is (config, core, data, runtime,
    train, evaluate, latents, export, stack, launch, demo)."""
    root = sorted(p.name for p in (ROOT / "dist_diffusion").glob("*.py"))
    assert len(root) <= ROOT_MODULES_MAX, root


# Where the whole config tree may be passed: the config package (it parses and checks the
# tree), the programs and launchers, and the one function each job starts at. Everything
# below an entry point receives its own sections (cfg.train, cfg.sample, ...).
WHOLE_CONFIG_MODULES = ("cli.py", "config/", "launch/", "demo/", "train/__main__.py")
JOB_ENTRY_POINTS = {"train/loop.py": {"train", "build_run"}, "train/checks.py": {"preflight"},
                    "train/objectives.py": {"objective"}, "evaluate/sample.py": {"evaluate", "check_inputs"},
                    "latents/encode.py": {"encode_dataset"}, "export/writer.py": {"write_export"}}


def whole_config_signatures(package: Path) -> list[str]:
    """Functions with a parameter annotated ``Config`` or named ``cfg`` (the tree's name)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if any(a.arg == "cfg" or (a.annotation is not None and ast.unparse(a.annotation).strip("'\"") == "Config")
                   for a in args):
                found.append(f"{path.relative_to(package).as_posix()}:{node.name}")
    return found


def test_only_entry_points_and_launchers_take_the_whole_config():
    allowed = [s for s in whole_config_signatures(ROOT / "dist_diffusion")
               if s.startswith(WHOLE_CONFIG_MODULES) or s.split(":")[1] in JOB_ENTRY_POINTS.get(s.split(":")[0], ())]
    others = [s for s in whole_config_signatures(ROOT / "dist_diffusion") if s not in allowed]
    assert others == [], f"{others}: pass the sections they read (cfg.sample, cfg.diffusion, ...), not the tree"
    assert len(allowed) <= 24, allowed  # config/ 8, cli 3, demo 5, the job entries 8


def test_the_whole_config_detector_finds_both_spellings(tmp_path):
    (tmp_path / "m.py").write_text("def a(cfg): pass\ndef b(x: Config): pass\ndef c(x: 'Config'): pass\n"
                                   "def d(sample: SampleConfig): pass\n")
    assert whole_config_signatures(tmp_path) == ["m.py:a", "m.py:b", "m.py:c"]


def test_sampler_names_are_listed_only_by_the_registry():
    """A collection naming two or more samplers anywhere but config/registry.py is a second
    list to keep in step; the schema's choices and core's tables read the registry."""
    from dist_diffusion.config.registry import SAMPLERS

    offenders = []
    for path in (ROOT / "dist_diffusion").rglob("*.py"):
        if path.relative_to(ROOT / "dist_diffusion").as_posix() == "config/registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                named = [i.value for i in items if isinstance(i, ast.Constant) and i.value in SAMPLERS]
                if len(named) >= 2:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {named}")
    assert offenders == []
