"""Bad input, as a new user types it: one `error:` line that names the key, file or URL
and the fix, a non-zero exit code, no traceback, and nothing on disk changed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The odd inputs: a source of unreadable images, a good one, a file where a directory
    belongs, shards whose manifest is not JSON, a VAE export where a UNet belongs."""
    root = tmp_path_factory.mktemp("bad")
    (root / "junk/a").mkdir(parents=True)
    (root / "junk/a/broken.jpg").write_text("not an image")
    (root / "good/a").mkdir(parents=True)
    Image.new("RGB", (20, 20), (90, 90, 90)).save(root / "good/a/x.png")
    (root / "a_file").write_text("I am a file\n")
    (root / "shards").mkdir()
    (root / "shards/manifest.json").write_text("{not json")
    (root / "vae_export").mkdir()
    (root / "vae_export/config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (root / "empty.yaml").write_text("# nothing here\n")
    return root


CASES = [  # id, argv (F = the files fixture's directory), exit code, what the line must say
    ("labels-file-missing", ["prepare", "--src", "F/good", "--out", "F/out1", "data.labels_file=F/nope.txt"], 2,
     "data.labels_file=F/nope.txt does not exist"),
    ("every-image-unreadable", ["prepare", "--src", "F/junk", "--out", "F/out2"], 2,
     "--src F/junk: none of its 1 images could be read (first: a/broken.jpg"),
    ("prepare-out-is-a-file", ["prepare", "--src", "F/good", "--out", "F/a_file"], 2, "--out F/a_file is a file"),
    ("manifest-not-json", ["train", "--config", "configs/tiny.yaml", "train.run_dir=F/run1", "data.shards=F/shards"],
     2, "F/shards/manifest.json is not a manifest (not JSON"),
    ("run-dir-is-a-file", ["train", "--config", "configs/tiny.yaml", "train.run_dir=F/a_file",
                           "data.shards=F/shards"], 2, "train.run_dir=F/a_file is a file"),
    ("vae-export-as-unet", ["sample", "--config", "configs/tiny.yaml", "eval.unet=F/vae_export"], 2,
     "eval.unet='F/vae_export' is an exported AutoencoderKL, not a UNet"),
    ("unet-missing", ["eval", "--config", "configs/tiny.yaml", "eval.unet=F/nowhere"], 2,
     "eval.unet='F/nowhere' is not an exported UNet directory"),
    ("empty-recipe", ["train", "--config", "F/empty.yaml"], 2, "F/empty.yaml is empty"),
    ("section-given-a-scalar", ["train", "--config", "configs/tiny.yaml", "model=5"], 2,
     "model must be a mapping of its keys"),
    ("unknown-signal", ["train", "--config", "configs/tiny.yaml", "train.preempt_signals=[SIGTERM,SIGFOO]"], 2,
     "train.preempt_signals has ['SIGFOO']"),
    ("negative-cfg-scale-in-sweep", ["eval", "--config", "configs/tiny.yaml", "eval.cfg_scales=[3,-1]"], 2,
     "eval.cfg_scales=[3.0, -1.0]: every scale must be >= 0"),
    ("too-many-steps-in-sweep", ["eval", "--config", "configs/tiny.yaml", "eval.steps=[50,5000]"], 2,
     "eval.steps=[50, 5000]: every step count must be in 1..1000"),
]


IN_A_RANK = {"manifest-not-json"}  # found once a rank runs: a real process


def run_cli(argv: list[str], in_process: bool, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `dist-diffusion ARGV`; in this process where no rank starts."""
    if not in_process:
        out = subprocess.run([sys.executable, "-m", "dist_diffusion.cli", *argv], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        return out.returncode, out.stderr
    from dist_diffusion.cli import main

    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name,argv,code,says", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_naming_the_fix(files, name, argv, code, says, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = sorted((p, p.stat().st_mtime_ns) for p in files.rglob("*") if p.is_file())
    got, err = run_cli([a.replace("F/", f"{files}/") for a in argv], name not in IN_A_RANK, capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("prepare:", "\r"))]
    assert got == code and "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("error: ") and says.replace("F/", f"{files}/") in lines[-1], err
    assert [(p, p.stat().st_mtime_ns) for p, _ in before] == before  # nothing that was there changed
    assert not [p for p in files.rglob("manifest.json") if p.parent.name != "shards"]  # no dataset claimed
