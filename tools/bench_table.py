"""`make bench`: run every bench/*.py, then print one table of each figure, its goal and
whether it meets it. Every figure is a ratio measured within one run of its script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GOALS = {  # figure: (comparison, bound)
    "ddim50_vs_ddpm1000_speedup": (">=", 18.0),
    "sample_scaling_2v1": (">=", 1.7),
    "sampler_vs_diffusers_ratio": (">=", 1.0),
    "s3_vs_local_ratio": (">=", 0.9),
    "stream_vs_webdataset_ratio": (">=", 1.0),
    "original_size_stream_vs_webdataset_ratio": (">=", 1.0),
    "stream_rss_growth_mb": ("<=", 50.0),
    "train_overhead_ratio": ("<=", 1.10),
    "train_with_background_checkpoints_ratio": ("<=", 1.05),
    "train_step_with_eval_vs_alone_ratio": ("<=", 1.05),
    "train_with_posthoc_ema_ratio": ("<=", 1.05),
    "gpu_framework_vs_plain_ratio": ("<=", 1.10),
    "two_node_vs_one_node_step_ratio": ("<=", 1.15),
}
SKIP = re.compile(r"^(\S+) bench skipped: (.+)$", re.MULTILINE)  # e.g. "gpu bench skipped: no CUDA"
NEEDS = {"gpu_framework_vs_plain_ratio": "gpu", "two_node_vs_one_node_step_ratio": "multinode",
         "train_step_with_eval_vs_alone_ratio": "eval_beside"}  # figure -> the bench that may skip it
FIGURE = re.compile(r"([a-z0-9_]+)=([-+0-9.eE]+)")


def run(script: Path, skipped: dict[str, str]) -> dict[str, float]:
    print(f"== {script}", flush=True)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{script} failed with exit code {done.returncode}")
    skipped.update(SKIP.findall(done.stdout))
    return {name: float(value) for name, value in FIGURE.findall(done.stdout)}


def main() -> int:
    rows, skipped = [], {}
    for script in sorted(Path("bench").glob("*.py")):
        for name, value in run(script, skipped).items():
            rows.append((script.name, name, value, GOALS.get(name)))
    print(f"\n| script | figure | measured | goal | met |\n|---|---|---|---|---|")
    missed = 0
    for script, name, value, goal in rows:
        if goal is None:
            print(f"| {script} | {name} | {value:g} | (context) | |")
            continue
        op, bound = goal
        met = value >= bound if op == ">=" else value <= bound
        missed += not met
        print(f"| {script} | {name} | {value:g} | {op} {bound:g} | {'yes' if met else 'NO'} |")
    absent = sorted(set(GOALS) - {name for _, name, _, _ in rows})
    for name in [n for n in absent if NEEDS.get(n) in skipped]:
        print(f"| | {name} | skipped: {skipped[NEEDS[name]]} | | |")
        absent.remove(name)
    if absent:
        print(f"figures with a goal that no script printed: {absent}")
    return 1 if missed or absent else 0


if __name__ == "__main__":
    raise SystemExit(main())
