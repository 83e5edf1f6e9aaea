"""What a run's evaluations add up to (``eval.during_training``): per evaluated step, rows in
``RUN/metrics.jsonl`` and the trackers; over all of them, ``RUN/eval/curve.png`` (each
figure of each sweep point against the training step) and ``RUN/eval/best.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..logs import get_logger

LOG = get_logger("watch")
CURVE = "curve.png"
BEST = "best.json"
FIGURES = ("fid", "fid_vs_floor", "fid_inf", "kid", "inception_score", "class_accuracy", "precision", "recall")
HIGHER_IS_BETTER = {"inception_score", "class_accuracy", "precision", "recall"}


def point_name(row: dict) -> str:
    """The sweep point's folder name, which the report row records as its samples path."""
    return Path(row["samples"]).name


def figures(report: dict) -> dict:
    """{"eval/<point>/<figure>": value} of one step's report."""
    out = {}
    for row in report["results"]:
        for figure in FIGURES:
            if row.get(figure) is not None:
                out[f"eval/{point_name(row)}/{figure}"] = row[figure]
    return out


def record_step(run_dir: Path, best_metric: str, step: int, reports: dict[int, dict], trackers) -> dict:
    """Step ``step``'s figures (``reports``: every evaluated step's report, this one's too) into
    metrics.jsonl and ``trackers`` (logs.trackers.Trackers), then the curve and the best step
    redrawn from all of them (in RUN/eval). Returns the best step's record."""
    report, eval_dir = reports[step], Path(run_dir) / "eval"
    values = figures(report)
    _append_line(Path(run_dir) / "metrics.jsonl", {"step": step, **values})
    curve = draw_curve(reports, eval_dir / CURVE)
    best = write_best(reports, best_metric, eval_dir / BEST)
    trackers.scalars(step, values)
    trackers.image("eval/curve", curve, step)
    grid = Path(report["results"][0]["samples"]) / "grid.png"
    if grid.is_file():
        trackers.image("eval/samples", grid, step)
    first = report["results"][0]
    LOG.info(f"step {step}: {point_name(first)} " + " ".join(
        f"{f} {first[f]:.4g}" for f in FIGURES if first.get(f) is not None) +
             f"; best so far: step {best['step']} ({best['metric']} {best['value']:.4g})")
    return best


def _append_line(path: Path, row: dict) -> None:
    """One line in one write(2) on an O_APPEND descriptor: the trainer appends to the same
    file, and neither splits the other's line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def write_best(reports: dict[int, dict], metric: str, path: Path) -> dict:
    """The best step by ``metric`` of the sweep's first point (ties: the earlier step)."""
    scored = [(step, report["results"][0].get(metric)) for step, report in sorted(reports.items())]
    scored = [(step, value) for step, value in scored if value is not None]
    if not scored:
        raise ValueError(f"no evaluated step reports eval.best_metric={metric}")
    sign = -1 if metric in HIGHER_IS_BETTER else 1
    step, value = min(scored, key=lambda item: (sign * item[1], item[0]))
    first = reports[step]["results"][0]
    best = {"step": step, "metric": metric, "value": value, "point": point_name(first),
            "export": str(path.parent / f"step-{step:06d}" / "unet"), "evaluated_steps": [s for s, _ in scored]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(best, indent=2) + "\n")
    os.replace(tmp, path)
    return best


def draw_curve(reports: dict[int, dict], path: Path) -> Path:
    """FID (and class accuracy, where the judge scores it) of every sweep point against the
    training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(reports)
    panels = [f for f in ("fid", "class_accuracy") if any(r.get(f) is not None for s in steps
                                                           for r in reports[s]["results"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, figure in zip(axes[0], panels):
        for index, row in enumerate(reports[steps[0]]["results"]):
            name = point_name(row)
            points = [(s, r[figure]) for s in steps for r in reports[s]["results"]
                      if point_name(r) == name and r.get(figure) is not None]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel(figure.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"evaluation during training ({reports[steps[0]]['results'][0]['num_samples']} samples a point)")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
