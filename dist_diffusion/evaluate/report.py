"""The evaluation report: ``OUT/report.json`` and a Markdown table ``OUT/report.md``."""

from __future__ import annotations

import json

from ..config import EvalConfig, SampleConfig
from ..config.registry import SAMPLERS
from ..data import storage
from ..logs import get_logger

LOG = get_logger("eval")

COLUMNS = [("guidance_scale", "CFG", "{:g}"), ("guidance_interval", "interval", "{}"), ("sampler", "sampler", "{}"),
           ("steps", "steps", "{}"), ("nfe", "NFE", "{}"), ("num_samples", "N", "{}"), ("fid", "FID", "{:.3f}"),
           ("fid_vs_floor", "FID / floor", "{:.2f}"), ("fid_inf", "FID_inf", "{:.3f}"), ("inception_score", "IS (10 splits)", "{:.3f}"),
           ("kid", "KID", "{:.4f}"), ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
           ("class_accuracy", "class acc", "{:.3f}"),
           ("seconds", "seconds", "{:.1f}"), ("samples_per_s", "samples/s", "{:.2f}")]


def result_row(sample: SampleConfig, num_train_timesteps: int, ev: EvalConfig, point_name: str, metrics: dict,
               seconds: float, resumed_shards: int) -> dict:
    """One report row: ``sample`` holds the point's sampler, steps and guidance scale."""
    return {"guidance_scale": sample.guidance_scale, "guidance_interval": list(sample.guidance_interval) or None,
            "sampler": sample.sampler, "steps": sample.steps, "eta": sample.eta,
            "nfe": SAMPLERS[sample.sampler].network_evaluations(sample.steps, num_train_timesteps),
            "num_samples": sample.num_samples, "seed": sample.seed, "checkpoint": _checkpoint(ev.unet),
            **metrics, "seconds": seconds, "samples_per_s": sample.num_samples / max(seconds, 1e-9),
            "resumed_shards": resumed_shards, "samples": str(storage.parse(ev.out).join(point_name))}


def _checkpoint(unet_dir: str) -> str:
    """The checkpoint an exported UNet came from (its own path if it does not say)."""
    from pathlib import Path

    meta = Path(unet_dir) / "dist_diffusion.json"
    return json.loads(meta.read_text()).get("checkpoint", unet_dir) if meta.is_file() else unet_dir


def markdown(rows: list[dict]) -> str:
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(ev: EvalConfig, rows: list[dict], features: str | None, judging: dict | None = None) -> None:
    out = storage.parse(ev.out)
    report = {"unet": ev.unet, "features": features, **(judging or {}), "results": rows}
    storage.write_bytes(out.join("report.json"), (json.dumps(report, indent=2) + "\n").encode())
    text = f"# Evaluation of {_checkpoint(ev.unet)}\n\nfeatures: {features or 'none'}\n\n" + _judging_lines(judging or {})
    text += markdown(rows)
    storage.write_bytes(out.join("report.md"), text.encode())
    LOG.info(text)


def _judging_lines(judging: dict) -> str:
    lines = []
    if "fid_real_floor" in judging:
        lines.append(f"reference: {judging['reference']} ({judging['reference_images']} images); FID floor "
                     f"{judging['fid_real_floor']:.3f}: {judging['fid_real_floor_n']} real images of "
                     f"{judging['fid_real_floor_images']} ({judging['fid_real_floor_source']}) against it")
    if "classifier_accuracy" in judging:
        acc = judging["classifier_accuracy"]
        where = "held-out" if acc.get("held_out") else "training"
        lines.append(f"judging classifier: accuracy {acc['top1']:.3f} on {acc['num_images']} real {where} images")
    return "".join(f"{line}\n\n" for line in lines)
