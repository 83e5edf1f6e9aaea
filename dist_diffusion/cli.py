"""`dist-diffusion`: the command line. Each subcommand parses the config tree once,
validates it, and only then starts work."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from . import __version__
from .config import ConfigError, field_docs, load_config, to_yaml
from .config.command_line import OneLineParser
from .errors import failure_line

# What a local rank of each `--nproc N` command imports, so the launcher imports it once and
# forks the ranks from itself (launch.local.spawn_local); drivers that run many commands
# (the demo, the tests) fork each from a server that imported all of them (run_forked).
_MODELS = ("dist_diffusion.core.models", "dist_diffusion.runtime.distributed")
_RANK_IMPORTS = {"train": ("dist_diffusion.train", *_MODELS), "sample": ("dist_diffusion.evaluate.sample", *_MODELS),
                 "encode": ("dist_diffusion.latents.encode", *_MODELS)}
_COMMAND_IMPORTS = tuple(sorted({module for modules in _RANK_IMPORTS.values() for module in modules}))


def run_forked(argv: list[str], **options) -> int:
    """`dist-diffusion ARGV` in a process of its own, forked from a server that imported every
    command's modules once, and its exit code; ``options`` as launch.local.run_command's."""
    from .launch.local import run_command

    return run_command(main, argv, _COMMAND_IMPORTS, **options)


def _spawn_ranks(argv: list[str], nproc: int, imports: str) -> int:
    """``nproc`` local ranks of ``dist-diffusion ARGV``, each importing what ``imports`` names."""
    from .launch.local import spawn_local

    return spawn_local(argv, nproc, main, _RANK_IMPORTS[imports])


def _cmd_config(args: argparse.Namespace) -> int:
    if args.docs:
        for key, doc in field_docs():
            print(f"{key:32s} {doc}")
        return 0
    cfg = load_config(args.config_option or args.config, args.overrides)
    if args.get:
        print(_lookup(cfg, args.get))
        return 0
    print(to_yaml(cfg), end="")
    if args.summary:
        _print_summary(cfg)
    return 0


def _load(path, overrides):
    """The validated config, and this process's S3 time limits set from it."""
    from .data import storage

    cfg = load_config(path, overrides)
    storage.configure(cfg.s3)
    return cfg


def _lookup(cfg, key: str):
    """The value of a dotted key (for scripts: `dist-diffusion config R --get train.run_dir`)."""
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise ConfigError(f"--get {key}: no such key; see `dist-diffusion config --docs`")
        node = getattr(node, part)
    return node


def _print_summary(cfg) -> None:
    from .core.models import build_unet, count_parameters
    from .config.shapes import unet_input_shape

    shape = "x".join(map(str, unet_input_shape(cfg.vae, cfg.data)))
    params = count_parameters(build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data))) / 1e6
    space = "latent" if cfg.vae.enabled else "pixel"
    print(f"# UNet: {params:.1f}M parameters on {space} inputs {shape}", file=sys.stderr)


def _cmd_stack(args: argparse.Namespace) -> int:
    from . import stack

    root = Path(args.root)
    if args.action == "up":
        server = stack.stack_up(root, args.host)
        print(f"S3 (SeaweedFS) on {server.endpoint}, pid {server.pid}, data in {server.root}")
        print("# export these so every command and boto3 reach it:")
        print(stack.export_lines(server))
    elif args.action == "down":
        print("stopped" if stack.stack_down(root) else "nothing was running")
    else:
        server = stack.stack_status(root)
        print(f"S3 up on {server.endpoint} (pid {server.pid})" if server else "S3 down")
        if server:
            print(stack.export_lines(server))
        return 0 if server else 1
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    cfg = _load(args.config, args.overrides)
    result = prepare(args.src, args.out, cfg.data, overwrite=args.overwrite)
    for bad in result["skipped"]:
        print(f"skipped unreadable image {bad['path']}: {bad['error']}", file=sys.stderr)
    print(f"{result['num_samples']} samples in {len(result['shards'])} shards, "
          f"{result['num_classes']} classes, {len(result['skipped'])} skipped -> {args.out}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .data.index import describe_sizes, index, read_class_names

    cfg, url = _load(args.config, args.overrides), args.url
    names = read_class_names(args.classes) if args.classes else None
    result = index(url, cfg.data.label_key, names, args.num_classes, overwrite=args.overwrite)
    print(f"{result['num_samples']} samples in {len(result['shards'])} shards, {result['num_classes']} classes, "
          f"{describe_sizes(result)} {result['image_format']} -> {url.rstrip('/')}/manifest.json")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)  # validate once, before spawning ranks
    _check_device(cfg)
    if args.nproc > 1:
        argv = ["encode", "--shards", args.shards, "--out", args.out, *args.overrides]
        return _spawn_ranks(argv + (["--config", args.config] if args.config else []), args.nproc, "encode")
    from .latents.encode import encode_dataset
    from .runtime.env import process_env

    result = encode_dataset(cfg, args.shards, args.out, process_env())  # this rank of spawn_local's, or the only one
    if result:
        shape = "x".join(map(str, result["latent_shape"]))
        print(f"{result['num_samples']} latents {shape} in {len(result['shards'])} shards -> {args.out}")
    return 0


def _cmd_calibrate_vae(args: argparse.Namespace) -> int:
    from .latents.calibrate import calibrate_directory

    result = calibrate_directory(args.vae, args.shards, args.out, args.images)
    stds = ", ".join(f"{s:.3f}" for s in result["latent_stats"]["latents_std"])
    print(f"latent std per channel {stds} over {result['latent_stats']['num_images']} images: now normalised to 1; "
          f"reconstruction PSNR {result['reconstruction']['psnr_db']:.2f} dB -> {result['out']}")
    return 0


def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate-vae", help="measure a VAE's latent mean/std per channel on image shards and "
                                             "store them in its config.json (unit-variance diffusion latents)")
    p.add_argument("--vae", required=True, help="a diffusers AutoencoderKL directory")
    p.add_argument("--shards", required=True, help="image shards from prepare (dir or s3://)")
    p.add_argument("--out", help="write the calibrated VAE here (default: in place)")
    p.add_argument("--images", type=_count(1), default=1024, help="images to measure on")
    p.set_defaults(func=_cmd_calibrate_vae)


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)  # validate once, before any worker starts
    _check_device(cfg)
    from .runtime.env import process_env
    from .train.checks import preflight

    nproc = args.nproc or cfg.runtime.nproc
    launching = process_env().world_size == 1  # not a rank of a launched job
    if launching:  # a rank of a launched job: build_run checks the same, once
        preflight(cfg, check_lock=nproc > 1)  # a single process takes the lock itself, at once

    def train_here() -> int:
        """Train in this process, or as ``nproc`` local ranks forked from it."""
        if nproc > 1:
            return _spawn_ranks(["train", "--config", args.config, "--nproc", "1", *args.overrides], nproc, "train")
        from .runtime.rank import run_rank
        from .train import train

        summary, code = run_rank(partial(train, cfg))
        if not code and process_env().is_main:
            print(f"trained to step {summary['step']} in {summary['run_dir']}")
        return code

    if not (launching and cfg.eval.during_training):
        return train_here()
    from .evaluate.beside import check_beside_training
    from .launch.beside import WatcherBeside

    check_beside_training(cfg.eval)
    with WatcherBeside(Path(cfg.train.run_dir), cfg.eval) as watcher:
        return watcher.training_ended(train_here())


def _check_device(cfg) -> None:
    """A GPU that was asked for and is missing, or a missing extra: one line here, before
    any rank starts."""
    from .extras import require, require_trackers

    nvidia = Path("/proc/driver/nvidia/version").exists()  # auto on a GPU node must find CUDA usable
    if cfg.runtime.device == "cuda" or cfg.launch.gpus_per_worker > 0 or cfg.runtime.device == "auto" and nvidia:
        from .runtime.distributed import check_cuda_usable

        check_cuda_usable(cfg.runtime.device, cfg.launch.gpus_per_worker > 0)
    if cfg.eval.metrics and cfg.eval.features == "inception":
        require("torch_fidelity", "eval", "eval.features=inception")
    require_trackers(cfg.log.trackers)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a directory; an export is a directory: name a new "
                          f"or existing directory")

    if args.best:
        return _export_best(Path(args.run_dir), Path(args.out))
    out = export_model(args.run_dir, args.out, "raw" if args.raw else "ema", args.step)
    kind = json.loads((out / "dist_diffusion.json").read_text())["target"]
    loader = "AutoencoderKL" if kind == "vae" else "UNet2DModel"
    print(f"exported the {'raw' if args.raw else 'EMA'} {kind} to {out} ({loader}.from_pretrained)")
    return 0


def _export_best(run_dir: Path, out: Path) -> int:
    """The best evaluated step's EMA (RUN/eval/best.json): the export the watcher made of it,
    kept after its checkpoint was pruned."""
    import shutil

    from .evaluate.beside import eval_root
    from .evaluate.curve import BEST

    record = eval_root(run_dir) / BEST
    if not record.is_file():
        raise ConfigError(f"{run_dir} has no {record.relative_to(run_dir)}: --best needs a run trained with "
                          f"eval.during_training=true (or `dist-diffusion watch --run-dir {run_dir}`)")
    best = json.loads(record.read_text())
    shutil.copytree(best["export"], out, dirs_exist_ok=True)
    print(f"exported the EMA of step {best['step']}, the best by {best['metric']} ({best['value']:.4g} at "
          f"{best['point']}), to {out} (UNet2DModel.from_pretrained)")
    return 0


def _cmd_ema_reconstruct(args: argparse.Namespace) -> int:
    from .export.posthoc import reconstruct_ema

    out, plan = reconstruct_ema(Path(args.run_dir), Path(args.out), args.sigma_rel, args.step)
    used = len({s.step for s, _ in plan.terms})
    print(f"the EMA of sigma_rel {args.sigma_rel:g} at step {plan.target_step}, from {len(plan.terms)} profile "
          f"snapshots of {used} steps (residual L1 {plan.bound[0]:.2e}), exported to {out} "
          f"(UNet2DModel.from_pretrained)")
    return 0


def _add_ema_parser(sub) -> None:
    p = sub.add_parser("ema-reconstruct", help="post-hoc EMA: the EMA of any relative length, rebuilt from the "
                                               "run's profile snapshots (train.ema.posthoc_sigma_rels), as an export")
    p.add_argument("--run-dir", required=True, help="the training run directory")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA length, e.g. 0.07 (EDM2)")
    p.add_argument("--step", type=_count(1), help="the step the EMA ends at (default: the last snapshot's)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_ema_reconstruct)


def _cmd_watch(args: argparse.Namespace) -> int:
    from .evaluate.beside import Watcher, check_beside_training, run_config

    if not args.run_dir and not (args.check and args.config):
        raise ConfigError("watch needs --run-dir RUN (or --check --config CONFIG to check a recipe)")
    # a launcher's check before training: the recipe; else the run's stored config, if written yet
    cfg = load_config(args.config, args.overrides) if args.config else run_config(Path(args.run_dir))
    if cfg is not None:
        check_beside_training(cfg.eval)
    if args.check:
        return 0
    summary = Watcher(Path(args.run_dir), args.nproc or None, args.poll_seconds, args.until_marked).run()
    print(f"evaluated steps {summary['evaluated']}" + (f"; skipped {summary['skipped']}" if summary['skipped'] else "")
          + f" -> {Path(args.run_dir) / 'eval'}")
    return 0


def _add_watch_parser(sub) -> None:
    p = sub.add_parser("watch", help="evaluate a run's checkpoints as they appear, beside training "
                                     "(eval.during_training; the launchers start it for you)")
    p.add_argument("--run-dir", help="the training run directory to follow (required unless --check)")
    p.add_argument("--config", help="with --check: the training recipe to check (with key=value overrides)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    p.add_argument("--nproc", type=_count(0), default=0, help="sampling processes (default, 0: eval.nproc)")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for new checkpoints")
    p.add_argument("--check", action="store_true", help="only check what the watcher needs, then exit")
    p.add_argument("--until-marked", action="store_true",
                   help="end only once RUN/eval/TRAINING_ENDED exists (the launchers write it), or after "
                        "eval.idle_minutes without a checkpoint; not when the stored config's last step is done")
    p.set_defaults(func=_cmd_watch)


def _cmd_sample(args: argparse.Namespace) -> int:
    """`sample` writes images (metrics off unless asked); `eval` also scores them."""
    overrides = [*args.overrides, *(["eval.metrics=false"] if args.command == "sample" and not args.metrics else [])]
    cfg = _load(args.config, overrides)  # validate once, before any worker starts
    _check_device(cfg)
    if cfg.eval.ema_sigma_rels:
        return _sweep_ema_lengths(args, overrides, cfg.eval.ema_sigma_rels, cfg.eval.out, cfg.train.run_dir)
    from .evaluate.sample import check_inputs

    check_inputs(cfg)
    if args.nproc > 1:
        return _spawn_ranks([args.command, "--config", args.config, "--nproc", "1", *overrides], args.nproc,
                            "sample")
    from .evaluate.sample import evaluate
    from .runtime.rank import run_rank

    return run_rank(partial(evaluate, cfg))[1]


def _sweep_ema_lengths(args: argparse.Namespace, overrides: list[str], sigma_rels: list[float], out: str,
                       run_dir: str) -> int:
    """eval.ema_sigma_rels: each length reconstructed, then evaluated like any export, each a
    command of its own (the reconstruction's tensor math stays out of the process that forks
    the ranks); then one report and the plot."""
    import subprocess

    from .evaluate.ema_sweep import EMASweep
    from .export.posthoc import snapshots

    snapshots(Path(run_dir))  # none: one line now
    sweep = EMASweep(Path(run_dir), out, sigma_rels)
    for sigma in sweep.sigma_rels:
        if sweep.evaluated(sigma):
            continue
        steps = [["ema-reconstruct", "--run-dir", run_dir, "--sigma-rel", f"{sigma:g}", "--out", str(sweep.export_dir(sigma))],
                 [args.command, "--config", args.config, "--nproc", str(args.nproc), *overrides, "eval.ema_sigma_rels=[]",
                  f"eval.unet={sweep.export_dir(sigma)}", f"eval.out={sweep.folder(sigma)}"]]
        for argv in steps[int((sweep.export_dir(sigma) / "dist_diffusion.json").is_file()):]:
            code = subprocess.run([sys.executable, "-m", "dist_diffusion.cli", *argv]).returncode
            if code:
                return code
    sweep.write_report()
    print(f"{len(sweep.sigma_rels)} EMA lengths evaluated -> {Path(out) / 'report.md'}, {Path(out) / 'fid_vs_ema_length.png'}")
    return 0


def _count(least: int):
    """argparse type: an integer >= ``least`` (a process count of 0 or -1 means nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
        return value
    return parse


def _add_index_parser(sub) -> None:
    p = sub.add_parser("index", help="write manifest.json for existing WebDataset shards (ShardWriter, "
                                     "img2dataset, tar), local or s3://")
    p.add_argument("url", help="directory or s3://bucket/prefix holding the .tar shards")
    p.add_argument("--config", help="YAML recipe whose data: section applies (data.label_key)")
    p.add_argument("--classes", help="file of class names, one per line (line i names label i)")
    p.add_argument("--num-classes", type=_count(0), default=0,
                   help="number of classes (default: the largest label + 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a manifest.json already there")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.label_key=label")
    p.set_defaults(func=_cmd_index)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dist-diffusion",
        description="Latent diffusion training and evaluation on clusters.")
    parser.add_argument("--version", action="version", version=f"dist-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("config", help="validate a recipe and print the resolved config tree")
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/tiny.yaml (or --config)")
    p.add_argument("--config", dest="config_option", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    p.add_argument("--docs", action="store_true", help="list every config key with its doc")
    p.add_argument("--summary", action="store_true", help="also print the model size (stderr)")
    p.add_argument("--get", metavar="KEY", help="print only the value of KEY (e.g. train.run_dir)")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("stack", help="start/stop the embedded local S3 (SeaweedFS on 127.0.0.1)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--root", default=".stack", help="where the stack keeps data and state")
    p.add_argument("--host", default="127.0.0.1", help="address S3 binds to (cluster.sh: the bridge's)")
    p.set_defaults(func=_cmd_stack)
    p = sub.add_parser("prepare", help="class-folder images -> WebDataset shards (local or s3://)")
    p.add_argument("--src", required=True, help="root of SRC/<class>/<images>")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--config", help="YAML recipe whose data: section applies")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite shards already in --out (needed when they were made with other settings)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.resolution=128")
    p.set_defaults(func=_cmd_prepare)
    _add_index_parser(sub)
    p = sub.add_parser("encode", help="image shards -> VAE latent shards (mean and std, float16)")
    p.add_argument("--shards", required=True, help="image shards from prepare (dir or s3://)")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--config", help="YAML recipe; vae.pretrained names the VAE directory")
    p.add_argument("--nproc", type=_count(1), default=1, help="local processes to split shards over")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_encode)
    p = sub.add_parser("train", help="train the UNet with DeepSpeed (resumes from the run directory)")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/tiny.yaml")
    p.add_argument("--nproc", type=_count(0), default=0, help="local processes (default, 0: runtime.nproc)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("export", help="latest complete checkpoint -> diffusers UNet/VAE (safetensors)")
    p.add_argument("--run-dir", required=True, help="the training run directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    p.add_argument("--step", type=_count(1), help="the complete checkpoint of this step (default: the latest)")
    p.add_argument("--best", action="store_true", help="the best step evaluated during training "
                                                       "(RUN/eval/best.json, eval.best_metric)")
    p.set_defaults(func=_cmd_export)
    _add_watch_parser(sub)
    _add_ema_parser(sub)
    _add_sampling_parsers(sub)
    _add_calibrate_parser(sub)
    return parser


def _add_sampling_parsers(sub) -> None:
    for name, text in (("sample", "distributed DDIM/DDPM/DPM-Solver + CFG sampling into shards and a grid"),
                       ("eval", "sample and score: FID / IS / class accuracy, report, CFG and step sweeps")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="YAML recipe; eval.unet names the exported UNet")
        p.add_argument("--nproc", type=_count(1), default=1, help="local processes to split the samples over")
        p.add_argument("--metrics", action="store_true", help=argparse.SUPPRESS if name == "eval" else
                       "also compute the metrics (as eval does)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sample.num_samples=1000")
        p.set_defaults(func=_cmd_sample)


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """argparse, with key=value overrides accepted anywhere on the line: argparse fills a
    positional list only once, so overrides after an option would be refused."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if extra != overrides or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before a run could stop at a boundary (e.g. while it starts)
        print(f"interrupted: dist-diffusion {args.command} stopped by Ctrl-C", file=sys.stderr)
        return 130
    except Exception as err:
        line = failure_line(err, getattr(args, "out", None))
        if line is not None:
            print(line, file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        print(f"error: an internal error in dist-diffusion {__version__} (a bug, not your input); please "
              f"report it with the traceback above and the command line", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
