"""`make demo`: the product end to end on the embedded stack, on CPU.

A real image set (``--dataset``: scikit-learn's handwritten digits, or scikit-image's
texture scans and photographs; see demo_data.py) is written as a class-folder tree of
32x32 RGB PNGs (the ImageNet-100 layout) and prepared into WebDataset shards in the
embedded S3 (SeaweedFS on loopback), a fifth held out. Then, each as a user would run
it: the domain classifier that judges samples trains; the small VAE trains
(`configs/vae_tiny.yaml`, 2 DeepSpeed processes), is exported (which measures its latent
statistics) and encodes the shards into latent shards (2 processes; 8x8x4, or 16x16x4 on
the textures); the class-conditional latent UNet trains on them from S3
(`configs/tiny.yaml`, 2 processes, ZeRO-2, bf16, CFG label dropout, EMA) and is
exported; UniPC + CFG samples are scored
against the held-out images, beside the FID of real images (the floor), and drawn as
PNG grids beside a grid of real images. The same recipes serve both data sets; the class
count differs, and where a data set's recipe differs, demo_data.py says so and why. The
stack is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cli import run_forked
from ..config import Config, ConfigError, derive, load_config, unet_input_shape
from ..core.models import build_unet
from ..data import storage
from ..data.prepare import prepare
from ..data.stream import ShardStream, StreamSpec
from ..export import export_model
from .datasets import DATASETS, folder_dataset
from ..extras import require
from ..imaging import save_grid
from ..stack import start_s3, stop_s3, weed_binary

# How the demo runs its data set's recipes (DemoDataset.unet_config, vae_config): the shards,
# the loader, a checkpoint (each evaluated beside training) every 150 steps.
UNET_OVERRIDES = ["data.samples_per_shard=256", "data.hflip=false", "data.num_workers=1", "train.ckpt_every=150",
                  "train.log_every=10"]
VAE_OVERRIDES = ["data.hflip=false", "data.num_workers=1", "train.warmup_steps=20"]
CLASSIFIER_OVERRIDES = ["data.num_workers=1"]
# Post-hoc EMA: EDM2's two profiles tracked, a snapshot with every checkpoint; after
# training these relative lengths are reconstructed and scored, and the best one is the
# EMA the demo samples (the run's fixed EMA, half-life 50 steps of 600, is about 0.12).
POSTHOC_OVERRIDES = ["train.ema.posthoc_sigma_rels=[0.05,0.1]", "train.ema.snapshot_every=0"]
EMA_LENGTHS = (0.05, 0.1, 0.15, 0.2)
HOLDOUT_FRACTION = 0.2  # of the images: the reference of FID and the judge's test set
FLOOR_MULTIPLE = 3.0  # domain FID at the highest scale within this multiple of real data's own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the UNet run")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits", help="the real image set")
    parser.add_argument("--src", help="your own class-folder tree (SRC/<class>/<images>) instead of --dataset: "
                                      "the whole demo on it, with the recipe that fits its image size")
    parser.add_argument("--out", help="where the demo writes everything (default: runs/demo, or "
                                      "runs/demo-DATASET for another data set)")
    parser.add_argument("--vae-steps", type=int, help="VAE training steps (default: the data set's)")
    parser.add_argument("--classifier-steps", type=int, default=300, help="domain classifier training steps")
    parser.add_argument("--eval-samples", type=int, default=500, help="samples per evaluated CFG scale")
    parser.add_argument("--beside-samples", type=int, default=200,
                        help="samples of each checkpoint evaluated during training (every 150 steps, CFG 3)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of every training and sampling job")
    args = parser.parse_args(argv)
    for module in ("sklearn", "skimage", "matplotlib"):  # missing extras: one line now, not after training
        require(module, "demo", "the demo")
    weed_binary()
    dataset = folder_dataset(Path(args.src)) if args.src else DATASETS[args.dataset]
    out = Path(args.out or ("runs/demo" if dataset.name == "digits" else f"runs/demo-{dataset.name}"))
    runs = DemoRuns(out, args, dataset)
    cfg = load_config(dataset.unet_config, runs.unet)  # every recipe validated before anything starts
    load_config(dataset.vae_config, runs.vae)
    load_config("configs/classifier_tiny.yaml", runs.classifier)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    report = on_stack(out, stages, lambda: _run_stages(cfg, runs, out, stages))
    report = {"stages": stages, "total_seconds": round(sum(stages.values()), 1), **report}
    report["quality"] = quality_bar(report)
    write_demo_report(report, out)
    return 0 if report["quality"]["passed"] else 4


def on_stack(out: Path, stages: dict, work):
    """``work()`` with the embedded S3 up (data in OUT/stack), stopped afterwards whatever
    happens, SIGTERM included."""
    server = stage(stages, "stack up", lambda: _stack_up(out / "stack"))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the finally below stops the S3 server
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        return work()
    finally:
        stage(stages, "stack down", lambda: stop_s3(server.pid))


def _exit_on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up must finish: the jobs stop on their own
    raise SystemExit(128 + signum)


def _interrupt_once(signum, frame):
    """Ctrl-C: the running job stops at its next boundary (the terminal signalled it too),
    then the clean-up stops the S3 server. A second Ctrl-C reaches the job, which then stops
    at once, and must not cut that clean-up short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class DemoRuns:
    """The overrides of the demo's three training runs and its evaluation, and the
    processes each training and sampling job starts."""

    def __init__(self, out: Path, args, dataset=None):
        self.nproc, self.dataset = str(args.nproc), dataset or DATASETS[args.dataset]
        classes = f"model.num_classes={self.dataset.num_classes}"
        vae_steps = self.dataset.vae_steps if args.vae_steps is None else args.vae_steps
        self.unet = [*UNET_OVERRIDES, *POSTHOC_OVERRIDES, f"train.max_steps={self.dataset.unet_steps}", classes,
                     *self.dataset.unet_overrides, *args.overrides]
        self.vae = [*VAE_OVERRIDES, classes, f"train.max_steps={vae_steps}",
                    f"train.ckpt_every={vae_steps}", f"train.run_dir={out / 'vae'}"]
        self.classifier = CLASSIFIER_OVERRIDES + [classes, f"train.max_steps={args.classifier_steps}",
                                                  f"train.ckpt_every={args.classifier_steps}",
                                                  f"train.run_dir={out / 'classifier'}"]
        self.eval = [f"sample.num_samples={args.eval_samples}", "eval.samples_per_shard=100",
                     "sample.batch_size=100"]
        # evaluation beside training: the watcher shares this machine's cores with the trainer
        # (a 2-core machine has none to give it alone), so eval.cpus asks for all of them
        beside_samples = getattr(args, "beside_samples", 200)  # drivers that build args themselves (the ablation)
        self.quick_eval = [f"sample.num_samples={beside_samples}", "eval.samples_per_shard=100",
                           "sample.batch_size=100", "eval.guidance_scales=[3]"]  # beside training, and of EMA lengths
        self.beside = ["eval.during_training=true", "eval.every_steps=150", f"eval.cpus={len(os.sched_getaffinity(0))}",
                       *self.quick_eval]


@dataclass(frozen=True)
class Prepared:
    """What every UNet run of the data set builds on: the shards, the judge, the VAE."""

    manifest: dict
    images_url: str
    latents_url: str
    classifier: Path
    vae: Path

    @property
    def reference_url(self) -> str:
        """The held-out images: FID's reference, never trained on."""
        return self.manifest["holdout"]["url"]


def prepare_judge_and_latents(cfg: Config, runs: DemoRuns, out: Path, stages: dict) -> Prepared:
    """Digits -> image shards in S3; the domain classifier and the VAE trained and exported;
    the image shards encoded into latent shards."""
    name = runs.dataset.name
    images_url, latents_url = f"s3://demo/{name}", f"s3://demo/{name}-latents"
    manifest = _prepare_data(cfg, runs.dataset, out, images_url, stages)
    stage(stages, "train classifier", lambda: _cli("train", "--config", "configs/classifier_tiny.yaml", "--nproc",
                                                    runs.nproc, *runs.classifier, f"data.shards={images_url}"))
    clf_dir = stage(stages, "export classifier", lambda: export_model(out / "classifier", out / "classifier_model"))
    stage(stages, "train vae", lambda: _cli("train", "--config", runs.dataset.vae_config, "--nproc", runs.nproc,
                                             *runs.vae, f"data.shards={images_url}"))
    vae_dir = stage(stages, "export vae", lambda: export_model(out / "vae", out / "vae_model"))
    stage(stages, "encode", lambda: _cli("encode", "--nproc", runs.nproc, "--shards", images_url, "--out", latents_url,
                                          "--config", runs.dataset.unet_config, f"vae.pretrained={vae_dir}"))
    return Prepared(manifest, images_url, latents_url, clf_dir, vae_dir)


def train_unet(name: str, overrides: list[str], out: Path, stages: dict, nproc: str = "2",
               config: str = "configs/tiny.yaml") -> Path:
    """``config`` with ``overrides`` trained by ``nproc`` processes into OUT/NAME, then its EMA
    exported to OUT/NAME_model."""
    stage(stages, f"train {name}", lambda: _cli("train", "--config", config, "--nproc", nproc,
                                                 *overrides, f"train.run_dir={out / name}"))
    return stage(stages, f"export {name}", lambda: export_model(out / name, out / f"{name}_model"))


def _run_stages(cfg: Config, runs: DemoRuns, out: Path, stages: dict) -> dict:
    data = prepare_judge_and_latents(cfg, runs, out, stages)
    with_vae = [f"vae.pretrained={data.vae}"]
    judge = [f"eval.classifier={data.classifier}", f"eval.reference={data.reference_url}"]
    unet_dir = train_unet("unet", [*runs.unet, *with_vae, f"data.shards={data.latents_url}", *runs.beside, *judge],
                          out, stages, runs.nproc, runs.dataset.unet_config)
    losses = [row["loss"] for row in training_rows(out / "unet/metrics.jsonl")]
    print(f"        {cfg.train.max_steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    judged = [*runs.unet, *with_vae, *runs.eval, *judge]
    recipe = runs.dataset.unet_config
    untrained = stage(stages, "eval untrained", lambda: evaluate(
        out / "eval_untrained", [*judged, f"eval.unet={_untrained_unet(cfg, out)}", "eval.guidance_scales=[3]"],
        runs.nproc, recipe))
    ema = stage(stages, "choose ema length", lambda: choose_ema_length(out, [*judged, *runs.quick_eval], runs.nproc,
                                                                      recipe))
    unet_dir = Path(ema["export"])
    results = stage(stages, "sample + eval", lambda: evaluate(
        out / "eval", [*judged, f"eval.unet={unet_dir}", f"eval.guidance_scales=[1,{cfg.sample.guidance_scale:g}]"],
        runs.nproc, recipe))
    for row in results:
        shutil.copy(out / "eval" / f"cfg{row['guidance_scale']:g}_steps{row['steps']}/grid.png",
                    out / f"samples_cfg{row['guidance_scale']:g}.png")
    plot_loss(out / "unet/metrics.jsonl", out / "loss.png")
    shutil.copy(out / "unet/eval/curve.png", out / "fid_curve.png")
    judging = json.loads((out / "eval/report.json").read_text())
    during = during_training(out / "unet")
    ema["fixed_ema_fid_domain"] = during["steps"][-1]["fid_domain"]  # the same N, scale and seeds
    return {"dataset": runs.dataset.name, "during_training": during, "posthoc_ema": ema,
            "what": runs.dataset.what, "accuracy_bar": runs.dataset.accuracy_bar,
            "results": [_demo_row(r) for r in results], "fid_domain_untrained": untrained[0]["fid"],
            "fid_real_floor": judging["fid_real_floor"], "fid_real_floor_n": judging["fid_real_floor_n"],
            "classifier_heldout_accuracy": judging["classifier_accuracy"]["top1"],
            "vae": json.loads((data.vae / "dist_diffusion.json").read_text())["reconstruction"],
            "loss_first": losses[0], "loss_last": losses[-1], "num_real_images": data.manifest["source_files"],
            "num_heldout_images": data.manifest["holdout"]["num_samples"]}


def choose_ema_length(out: Path, overrides: list[str], nproc: str, recipe: str) -> dict:
    """Post-hoc EMA: each of EMA_LENGTHS reconstructed from the UNet run's snapshots and
    scored (the evaluation-during-training settings: 200 samples at CFG 3); the best by FID
    is the EMA the demo samples."""
    sweep = out / "eval_ema"
    shutil.rmtree(sweep, ignore_errors=True)
    lengths = ",".join(f"{s:g}" for s in EMA_LENGTHS)
    _cli("eval", "--config", recipe, "--nproc", nproc, *overrides, f"train.run_dir={out / 'unet'}",
         f"eval.ema_sigma_rels=[{lengths}]", f"eval.out={sweep}")
    rows = json.loads((sweep / "report.json").read_text())["results"]
    best = min(rows, key=lambda r: r["fid"])
    shutil.copy(sweep / "fid_vs_ema_length.png", out / "fid_vs_ema_length.png")
    return {"lengths": [{"sigma_rel": r["ema_sigma_rel"], "fid_domain": r["fid"], "class_accuracy": r["class_accuracy"],
                         "num_samples": r["num_samples"], "guidance_scale": r["guidance_scale"]} for r in rows],
            "chosen": best["ema_sigma_rel"], "export": str(sweep / f"ema-{best['ema_sigma_rel']:g}" / "unet")}


def during_training(run_dir: Path) -> dict:
    """What the watcher measured beside training: each evaluated step's figures, the best."""
    steps = []
    for path in sorted((run_dir / "eval").glob("step-*/report.json")):
        row = json.loads(path.read_text())["results"][0]
        steps.append({"step": int(path.parent.name.split("-")[1]), "guidance_scale": row["guidance_scale"],
                      "num_samples": row["num_samples"], "fid_domain": row["fid"],
                      "class_accuracy": row["class_accuracy"]})
    return {"steps": steps, "best": json.loads((run_dir / "eval/best.json").read_text())}


def _untrained_unet(cfg: Config, out: Path) -> Path:
    """The UNet as training starts it (same seed, step 0): the baseline of the quality bar."""
    torch.manual_seed(cfg.train.seed)
    path = out / "unet_untrained"
    build_unet(cfg.model, unet_input_shape(cfg.vae, cfg.data)).save_pretrained(path)
    return path


def evaluate(eval_out: Path, overrides: list[str], nproc: str = "2", config: str = "configs/tiny.yaml") -> list[dict]:
    """`dist-diffusion eval` of ``config`` on ``nproc`` processes into a fresh ``eval_out``; its report rows."""
    shutil.rmtree(eval_out, ignore_errors=True)  # a fresh demo measures afresh
    _cli("eval", "--config", config, "--nproc", nproc, *overrides, f"eval.out={eval_out}")
    return json.loads((eval_out / "report.json").read_text())["results"]


def _demo_row(row: dict) -> dict:
    return {"guidance_scale": row["guidance_scale"], "sampler": row["sampler"], "steps": row["steps"],
            "fid_domain": row["fid"], "class_accuracy": row["class_accuracy"], "num_samples": row["num_samples"],
            "seconds": round(row["seconds"], 2), "samples_per_s": round(row["samples_per_s"], 2)}


def quality_bar(report: dict) -> dict:
    """The demo's promise: CFG gives the asked digit, and training moved the samples to the data."""
    by_scale = {r["guidance_scale"]: r for r in report["results"]}
    low, high = by_scale[min(by_scale)], by_scale[max(by_scale)]
    checks = {
        f"class accuracy at CFG {high['guidance_scale']:g} >= {report['accuracy_bar']:.2f}":
            high["class_accuracy"] >= report["accuracy_bar"],
        f"domain FID at CFG {high['guidance_scale']:g} <= {FLOOR_MULTIPLE:g}x the real-data floor":
            high["fid_domain"] <= FLOOR_MULTIPLE * report["fid_real_floor"],
        f"class accuracy at CFG {high['guidance_scale']:g} >= at CFG {low['guidance_scale']:g}":
            high["class_accuracy"] >= low["class_accuracy"],
        "domain FID <= 1/3 of the untrained model's":
            all(r["fid_domain"] <= report["fid_domain_untrained"] / 3 for r in report["results"]),
    }
    return {"checks": checks, "passed": all(checks.values())}


def training_rows(metrics: Path) -> list[dict]:
    """The training steps' rows of metrics.jsonl (evaluation during training adds rows of its own)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def plot_loss(metrics: Path, path: Path) -> None:
    require("matplotlib", "demo", "the demo's loss plot").use("Agg")
    import matplotlib.pyplot as plt

    rows = training_rows(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss (epsilon MSE)", title="latent UNet training loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_demo_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    floor = report["fid_real_floor"]
    lines = [f"# dist_diffusion demo: {report['dataset']}", "",
             f"{report['num_real_images']} {report['what']}, {report['num_heldout_images']} of them held out; whole demo "
             f"{report['total_seconds']:.0f} s.", "",
             "| CFG | sampler | steps | N | domain FID | FID / floor | class accuracy | samples/s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['guidance_scale']:g} | {r['sampler']} | {r['steps']} | {r['num_samples']} | {r['fid_domain']:.3f} "
              f"| {r['fid_domain'] / floor:.2f} | {r['class_accuracy']:.3f} | {r['samples_per_s']:.1f} |"
              for r in report["results"]]
    lines += ["", f"Real-data floor: domain FID {floor:.3f} ({report['fid_real_floor_n']} training images against "
              f"the held-out reference). Judging classifier: accuracy {report['classifier_heldout_accuracy']:.3f} on "
              f"held-out images. VAE: reconstruction PSNR {report['vae']['psnr_db']:.1f} dB on held-out images.", "",
              f"Untrained model (step 0, CFG 3): domain FID {report['fid_domain_untrained']:.3f}.", "",
              *_during_training_lines(report["during_training"]),
              *_posthoc_lines(report["posthoc_ema"]),
              "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in report["stages"].items()], "",
              "Quality bar:", *[f"- [{'x' if ok else ' '}] {name}" for name, ok in report["quality"]["checks"].items()]]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    verdict = "met" if report["quality"]["passed"] else "MISSED"
    print(f"[done] {report['total_seconds']:.0f}s; quality bar {verdict}; files in {out}: report.md, "
          f"report.json, real.png, samples_cfg*.png, loss.png, fid_curve.png, fid_vs_ema_length.png")


def _during_training_lines(during: dict) -> list[str]:
    steps, best = during["steps"], during["best"]
    if not steps:
        return []
    first = steps[0]
    lines = [f"Evaluated beside training ({first['num_samples']} samples at CFG {first['guidance_scale']:g} per "
             f"checkpoint; fid_curve.png):", "", "| step | domain FID | class accuracy |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['fid_domain']:.3f} | {s['class_accuracy']:.3f} |" for s in steps]
    return lines + ["", f"Best step by {best['metric']}: {best['step']} (`dist-diffusion export --best`).", ""]


def _posthoc_lines(ema: dict) -> list[str]:
    first = ema["lengths"][0]
    lines = [f"Post-hoc EMA ({first['num_samples']} samples at CFG {first['guidance_scale']:g} per length; "
             f"fid_vs_ema_length.png):", "", "| sigma_rel | domain FID | class accuracy |", "|---|---|---|"]
    lines += [f"| {r['sigma_rel']:g} | {r['fid_domain']:.3f} | {r['class_accuracy']:.3f} |" for r in ema["lengths"]]
    return lines + ["", f"The demo samples the EMA of sigma_rel {ema['chosen']:g}, the best by FID; the run's fixed "
                        f"EMA scored {ema['fixed_ema_fid_domain']:.3f} at the last step with the same samples.", ""]


def _prepare_data(cfg: Config, dataset, out: Path, url: str, stages: dict) -> dict:
    folders = out / dataset.name
    count = stage(stages, dataset.name, lambda: dataset.write(folders))
    print(f"        {count} {dataset.what} as a class-folder tree in {folders}")
    storage.s3_client().create_bucket(Bucket="demo")
    data = derive(cfg, {"data.holdout_fraction": HOLDOUT_FRACTION}).data
    manifest = stage(stages, "prepare", lambda: prepare(folders, url, data))
    print(f"        {manifest['num_samples']} samples in {len(manifest['shards'])} shards at {url}, "
          f"{manifest['holdout']['num_samples']} held out at {manifest['holdout']['url']}")
    spec = StreamSpec(url=url, batch_size=cfg.train.batch_size, num_workers=0, seed=cfg.train.seed,
                      hflip=cfg.data.hflip)
    batch = next(iter(ShardStream(spec)))
    print(f"        streamed back: images {tuple(batch['image'].shape)}, labels {batch['label'][:12].tolist()}...")
    save_grid(_real_rows(batch["image"], batch["label"], 4), out / "real.png", nrow=4, scale=4)
    return manifest


def _cli(*args: str) -> None:
    """A product command as a user runs it, in a process of its own (the trainer starts its 2
    DeepSpeed processes); the processes share one import of torch and diffusers."""
    code = run_forked(list(args))
    if code:
        raise subprocess.CalledProcessError(code, ["dist-diffusion", *args])


def stage(stages: dict, name: str, work):
    """Run one named stage and print it with its time (one line per stage)."""
    started = time.perf_counter()
    result = work()
    stages[name] = round(time.perf_counter() - started, 2)
    print(f"[{name}] {stages[name]:.1f}s")
    return result


def _stack_up(root: Path):
    """The embedded S3 for this run; its keys go into this process's environment."""
    server = start_s3(root)
    os.environ.update(server.env())
    storage.s3_client.cache_clear()
    print(f"        SeaweedFS S3 on {server.endpoint} (pid {server.pid})")
    return server


def _real_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Real images grouped by class, up to per_class each (gaps filled with blanks)."""
    rows = []
    for c in range(int(labels.max()) + 1):
        row = images[labels == c][:per_class]
        rows.append(torch.cat([row, -torch.ones(per_class - len(row), *images.shape[1:])]))
    return torch.cat(rows)


def run_as_script(entry) -> None:
    """``entry()`` as the process's exit code; a bad override or a missing extra is one line,
    before any stage."""
    try:
        raise SystemExit(entry())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: stopped by Ctrl-C; its jobs saved what they had and the S3 server is stopped",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    run_as_script(main)
