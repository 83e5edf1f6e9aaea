"""`make ablation`: the seed report's comparison on the digits, from one command.

On the demo's stack and data (real digits in the embedded S3, the domain classifier as the
judge, the small VAE), four UNets train with the demo's recipe (`configs/tiny.yaml`,
2 DeepSpeed processes by default, label dropout 0.1), differing in one thing each:

- ``latent_linear``: VAE latents, linear schedule (the base);
- ``latent_cosine``: the same with the cosine schedule;
- ``pixel_linear``: pixels, no VAE (the same UNet on 32x32x3 instead of 8x8x4);
- ``latent_flow``: the base's latents, UNet and steps, trained as rectified flow (velocity
  target, logit-normal t) instead of DDPM, and sampled with its Euler ODE steps.

Each row then samples one of them with one sampler, step count and CFG scale, through the
product's own `dist-diffusion eval` (as many processes, the same seeds and N for every row).
Rows that only change the sampler or the guidance reuse the base UNet: they judge the
sampling of one trained model, which is what they compare. One job per (model, CFG
scale) samples its rows as one sweep (`eval.samplers=[ddim:50,ddpm:1000,...]`).

Writes OUT/report.json, OUT/report.md (one table: domain FID, IS, KID, precision, recall,
class accuracy, NFE, seconds per 100 samples), OUT/fid_vs_nfe.png and a grid per row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

from ..config import load_config
from ..extras import require
from ..stack import weed_binary
from . import run as demo


@dataclass(frozen=True)
class Row:
    """One line of the table: which trained UNet, sampled how."""

    name: str
    model: str
    sampler: str
    steps: int
    guidance_scale: float

    @property
    def job(self) -> tuple[str, float]:
        """Rows of one UNet at one CFG scale are one sampling job (its samplers a sweep)."""
        return self.model, self.guidance_scale


ROWS = [
    Row("base: latent, linear, DDIM-50, CFG 3", "latent_linear", "ddim", 50, 3.0),
    Row("no guidance (CFG 1)", "latent_linear", "ddim", 50, 1.0),
    Row("cosine schedule", "latent_cosine", "ddim", 50, 3.0),
    Row("pixel space (no VAE)", "pixel_linear", "ddim", 50, 3.0),
    Row("DDPM-1000", "latent_linear", "ddpm", 1000, 3.0),
    Row("DDIM-100", "latent_linear", "ddim", 100, 3.0),
    Row("DDIM-250", "latent_linear", "ddim", 250, 3.0),
    Row("DPM-Solver++(2M) 20", "latent_linear", "dpm_solver_2m", 20, 3.0),
    Row("UniPC-bh2 10", "latent_linear", "unipc", 10, 3.0),
    Row("rectified flow, Euler-50", "latent_flow", "flow_euler", 50, 3.0),
]
SCHEDULE = {"latent_linear": "linear", "latent_cosine": "cosine", "pixel_linear": "linear",
            "latent_flow": "rectified flow"}
FLOW = ["diffusion.process=rectified_flow", "diffusion.prediction=v", "diffusion.time_distribution=logit_normal",
        "sample.sampler=flow_euler"]
SAMPLER_ROWS = ("latent_linear", 3.0)  # the rows of the FID-against-NFE plot: the base UNet at CFG 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation", help="where the ablation writes everything")
    parser.add_argument("--unet-steps", type=int, default=400,
                        help="training steps of every UNet (the same for all four, so only one thing differs)")
    parser.add_argument("--vae-steps", type=int, default=400, help="VAE training steps")
    parser.add_argument("--classifier-steps", type=int, default=300, help="domain classifier training steps")
    parser.add_argument("--samples", type=int, default=200, help="samples per row (the same seeds in every row)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of every training and sampling job")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every UNet run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for module in ("sklearn", "matplotlib"):  # missing extras: one line now, not after training
        require(module, "demo", "the ablation")
    weed_binary()
    out = Path(args.out)
    runs = demo.DemoRuns(out, argparse.Namespace(overrides=[*args.overrides, f"train.max_steps={args.unet_steps}"],
                                                 vae_steps=args.vae_steps, classifier_steps=args.classifier_steps,
                                                 eval_samples=args.samples, nproc=args.nproc, dataset="digits"))
    cfg = load_config("configs/tiny.yaml", runs.unet)  # every recipe validated before anything starts
    for model in SCHEDULE:
        load_config("configs/tiny.yaml", [*runs.unet, *model_overrides(model, None)])
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    started = time.perf_counter()
    rows = demo.on_stack(out, stages, lambda: run_rows(cfg, runs, out, stages))
    report = {"total_seconds": round(time.perf_counter() - started, 1), "unet_steps": args.unet_steps,
              "num_samples": args.samples, "stages": stages, "rows": rows}
    write_report(report, out)
    return 0


def model_overrides(model: str, data: "demo.Prepared | None") -> list[str]:
    """What sets a model apart, for its training and for its sampling job alike."""
    schedule = FLOW if model.endswith("flow") else [f"diffusion.schedule={SCHEDULE[model]}"]
    if model.startswith("pixel"):
        return [*schedule, "vae.enabled=false", *([f"data.shards={data.images_url}"] if data else [])]
    vae = [f"vae.pretrained={data.vae}", f"data.shards={data.latents_url}"] if data else []
    return [*schedule, *vae]


def run_rows(cfg, runs: "demo.DemoRuns", out: Path, stages: dict) -> list[dict]:
    data = demo.prepare_judge_and_latents(cfg, runs, out, stages)
    exports = {model: demo.train_unet(model, [*runs.unet, *model_overrides(model, data)], out, stages, runs.nproc)
               for model in SCHEDULE}
    judged = [*runs.unet, *runs.eval, f"eval.classifier={data.classifier}", f"eval.reference={data.reference_url}"]
    results = {}
    for (model, scale), group in groupby(sorted(ROWS, key=lambda r: r.job), key=lambda r: r.job):
        samplers = ",".join(f"{r.sampler}:{r.steps}" for r in group)
        name = f"{model}_cfg{scale:g}"
        found = demo.stage(stages, f"eval {name}", lambda: demo.evaluate(out / "eval" / name, [
            *judged, *model_overrides(model, data), f"eval.unet={exports[model]}", f"eval.samplers=[{samplers}]",
            f"eval.guidance_scales=[{scale:g}]"], runs.nproc))
        results.update({(model, r["sampler"], scale, r["steps"]): r for r in found})
    return [table_row(row, results[(row.model, row.sampler, row.guidance_scale, row.steps)], stages[f"train {row.model}"],
                      out) for row in ROWS]


def table_row(row: Row, result: dict, train_seconds: float, out: Path) -> dict:
    """A row of the table from its job's report row; its grid copied to OUT/grids/."""
    grid = Path(result["samples"]) / "grid.png"
    copy = out / "grids" / f"{row.model}_{row.sampler}{row.steps}_cfg{row.guidance_scale:g}.png"
    copy.parent.mkdir(exist_ok=True)
    if grid.exists():
        shutil.copy(grid, copy)
    keys = ("fid", "fid_inf", "inception_score", "kid", "precision", "recall", "class_accuracy", "nfe",
            "num_samples")
    return {**asdict(row), "domain": "pixel" if row.model.startswith("pixel") else "latent",
            "schedule": SCHEDULE[row.model], **{k: result.get(k) for k in keys},
            "seconds_per_100_samples": 100 * result["seconds"] / result["num_samples"],
            "train_seconds": train_seconds, "grid": str(copy.relative_to(out))}


COLUMNS = [("name", "row", "{}"), ("domain", "domain", "{}"), ("schedule", "schedule", "{}"),
           ("sampler", "sampler", "{}"), ("nfe", "NFE", "{}"), ("guidance_scale", "CFG", "{:g}"),
           ("fid", "domain FID", "{:.2f}"), ("inception_score", "IS", "{:.2f}"), ("kid", "KID", "{:.4f}"),
           ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
           ("class_accuracy", "class acc", "{:.3f}"), ("seconds_per_100_samples", "s / 100 samples", "{:.1f}"),
           ("train_seconds", "train s", "{:.0f}")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[k]) if row.get(k) is not None else "-"
                                       for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_fid_vs_nfe(report["rows"], out / "fid_vs_nfe.png")
    text = (f"# dist_diffusion ablation on the digits\n\nEvery UNet: {report['unet_steps']} steps; every row: "
            f"{report['num_samples']} samples with the same seeds, judged by the domain classifier against the "
            f"real digits. Whole run {report['total_seconds']:.0f} s.\n\n" + markdown_table(report["rows"]) +
            "\nFID against NFE (the base UNet at CFG 3): fid_vs_nfe.png\n")
    (out / "report.md").write_text(text)
    print(text)
    print(f"[done] files in {out}: report.md, report.json, fid_vs_nfe.png, grids/")


def plot_fid_vs_nfe(rows: list[dict], path: Path) -> None:
    require("matplotlib", "demo", "the ablation's plot").use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if (r["model"], r["guidance_scale"]) == SAMPLER_ROWS and r["fid"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for sampler in sorted({r["sampler"] for r in points}):
        mine = sorted((r for r in points if r["sampler"] == sampler), key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in mine], [r["fid"] for r in mine], marker="o", label=sampler)
    ax.set(xscale="log", xlabel="NFE (network evaluations per sample)", ylabel="domain FID",
           title="sampler: FID against NFE (latent, linear, CFG 3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    demo.run_as_script(main)
