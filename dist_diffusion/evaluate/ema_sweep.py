"""Choosing the EMA length after training (``eval.ema_sigma_rels``): each relative length
is reconstructed from the run's post-hoc EMA snapshots (``dist-diffusion ema-reconstruct``)
into OUT/ema-<sigma_rel>/unet and evaluated like any export into OUT/ema-<sigma_rel>/; the
rows are gathered into OUT/report.json (one per length and sweep point, each with its
``ema_sigma_rel``) and plotted as OUT/fid_vs_ema_length.png. A rerun skips the lengths
already evaluated, and the eval job resumes a half-sampled one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data import storage
from ..logs import get_logger
from .report import markdown

LOG = get_logger("eval")
PLOT = "fid_vs_ema_length.png"


class EMASweep:
    def __init__(self, run_dir: Path, out: str, sigma_rels: list[float]):
        if storage.parse(out).is_s3:
            from ..config import ConfigError

            raise ConfigError(f"eval.ema_sigma_rels writes its exports beside the samples: eval.out={out} must be a "
                              f"directory, not s3://")
        self.run_dir, self.out, self.sigma_rels = Path(run_dir), Path(out), list(sigma_rels)

    def folder(self, sigma_rel: float) -> Path:
        return self.out / f"ema-{sigma_rel:g}"

    def export_dir(self, sigma_rel: float) -> Path:
        return self.folder(sigma_rel) / "unet"

    def evaluated(self, sigma_rel: float) -> bool:
        return (self.folder(sigma_rel) / "report.json").is_file()

    def write_report(self) -> list[dict]:
        """Every length's rows in one report, and the plot of FID against the length."""
        rows, judging = [], {}
        for sigma in self.sigma_rels:
            report = json.loads((self.folder(sigma) / "report.json").read_text())
            judging = {k: v for k, v in report.items() if k not in ("results", "unet")}
            rows += [{"ema_sigma_rel": sigma, **row} for row in report["results"]]
        (self.out / "report.json").write_text(json.dumps({"run_dir": str(self.run_dir), **judging, "results": rows},
                                                         indent=2) + "\n")
        (self.out / "report.md").write_text(f"# Post-hoc EMA lengths of {self.run_dir}\n\n" + _table(rows))
        self._plot(rows)
        LOG.info(_table(rows))
        return rows

    def _plot(self, rows: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for point in dict.fromkeys(Path(r["samples"]).name for r in rows):
            mine = [r for r in rows if Path(r["samples"]).name == point]
            ax.plot([r["ema_sigma_rel"] for r in mine], [r["fid"] for r in mine], marker="o", label=point)
        ax.set(xlabel="EMA length sigma_rel (post-hoc)", ylabel="FID", title="FID against the EMA length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = self.out / f".{PLOT}"
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, self.out / PLOT)


def _table(rows: list[dict]) -> str:
    lines = ["| sigma_rel | " + markdown(rows).splitlines()[0][2:]]
    lines.append("|---" + markdown(rows).splitlines()[1])
    lines += [f"| {row['ema_sigma_rel']:g} | " + line[2:] for row, line in zip(rows, markdown(rows).splitlines()[2:])]
    return "\n".join(lines) + "\n"
