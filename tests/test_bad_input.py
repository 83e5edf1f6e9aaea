"""Bad input, as a new user types it: one `error:` line that names the key, file or URL
and the fix, a non-zero exit code, no traceback, and nothing on disk or in S3 changed.

Every case runs `dist-diffusion` in this process (each is refused before a rank starts);
the S3 cases talk to the session's real SeaweedFS, or to endpoints that are dead."""

import json
import re
import socket
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_one_line, make_class_folders, make_pairs, run_cli

ROOT = Path(__file__).resolve().parents[1]
T = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The odd inputs under F/: a source of unreadable images, a good one, a file where a
    directory belongs, shards whose manifest is not JSON, a VAE export where a UNet or a
    classifier belongs, bad recipes, a dataset prepared at 16 px, a latent manifest, and a
    run directory whose checkpoints belong to the tiny UNet."""
    from dist_diffusion.config import DataConfig, load_config, to_yaml
    from dist_diffusion.data.prepare import prepare

    root = tmp_path_factory.mktemp("bad")
    (root / "junk/a").mkdir(parents=True)
    (root / "junk/a/broken.jpg").write_text("not an image")
    (root / "good/a").mkdir(parents=True)
    Image.new("RGB", (20, 20), (90, 90, 90)).save(root / "good/a/x.png")
    (root / "emptysrc").mkdir()
    (root / "a_file").write_text("I am a file\n")
    (root / "shards").mkdir()
    (root / "shards/manifest.json").write_text("{not json")
    for name, config in (("vae_export", {"_class_name": "AutoencoderKL", "latent_channels": 4}),
                         ("unet", {"_class_name": "UNet2DModel", "in_channels": 4, "sample_size": 8})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "unet/dist_diffusion.json").write_text(json.dumps(  # as exports wrote it before snr_shift
        {"target": "unet", "prediction": "epsilon", "schedule": "linear", "num_train_timesteps": 1000}))
    (root / "empty.yaml").write_text("# nothing here\n")
    (root / "broken.yaml").write_text("model: [\n")
    (root / "list.yaml").write_text("- model\n- train\n")
    make_class_folders(root / "src2", classes=2, per_class=3)
    prepare(root / "src2", str(root / "made16"), DataConfig(resolution=16, samples_per_shard=4), progress=False)
    (root / "latents").mkdir()
    (root / "latents/manifest.json").write_text(json.dumps(
        {"kind": "latents", "latent_shape": [4, 8, 8], "num_classes": 2, "classes": ["a", "b"], "num_samples": 0,
         "shards": [], "scaling_factor": 1.0}))
    _index_inputs(root)
    (root / "oldrun/checkpoints/step00000010").mkdir(parents=True)
    (root / "oldrun/checkpoints/step00000010/COMPLETE").write_text("{}")
    (root / "oldrun/config.yaml").write_text(to_yaml(load_config(ROOT / T)))
    return root


def _index_inputs(root: Path) -> None:
    """Shards made elsewhere that `index` must refuse: a sample without an image, labels
    0..2 for a class count of 2, a tar with a key's files apart, and a folder with no tar at
    all (images of mixed sizes are accepted: tests/test_resize.py)."""
    import tarfile

    def tar_up(folder: Path, out: Path, drop=()) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w") as tar:
            for f in sorted(folder.iterdir()):
                if f.name not in drop:
                    tar.add(f, arcname=f.name)

    pairs = make_pairs(root / "pairs", count=6)
    tar_up(pairs, root / "idx_noimage/a-000.tar", drop={"000004.jpg"})
    tar_up(pairs, root / "idx_range/a-000.tar")
    (root / "idx_unsorted").mkdir()
    with tarfile.open(root / "idx_unsorted/a-000.tar", "w") as tar:
        for f in sorted(pairs.iterdir(), key=lambda f: (f.suffix, f.name)):  # every .cls, then every .jpg
            tar.add(f, arcname=f.name)
    (root / "idx_empty").mkdir()
    (root / "idx_empty/readme.txt").write_text("no shards here\n")


def case(name, argv, says, code=2):
    return pytest.param(argv.split(), code, says, id=name)


CONFIG = [  # a recipe or override that is wrong: found when the config loads
    case("unknown-key", f"config {T} train.max_stepz=20", "train.max_stepz: Key 'max_stepz' not in"),
    case("unknown-section", f"config {T} foo.bar=1", "foo: Key 'foo' not in 'Config'"),
    case("wrong-type", f"config {T} train.max_steps=abc", "train.max_steps: Value 'abc'"),
    case("list-for-a-number", f"config {T} train.max_steps=[1,2]", "train.max_steps: Value '[1, 2]'"),
    case("zero-steps", f"config {T} train.max_steps=0", "train.max_steps=0 must be >= 1"),
    case("negative-lr", f"config {T} train.lr=-1", "train.lr=-1.0 must be > 0.0"),
    case("unknown-sampler", f"config {T} sample.sampler=euler", "sample.sampler='euler' is not one of"),
    case("unknown-preset", f"config {T} model.preset=huge", "model.preset='huge' is not one of"),
    case("zero-stage-4", f"config {T} runtime.zero_stage=4", "runtime.zero_stage=4 must be <= 3"),
    case("unknown-schedule", f"config {T} diffusion.schedule=quadratic", "diffusion.schedule='quadratic'"),
    case("tiny-resolution", f"config {T} data.resolution=4", "data.resolution=4 must be >= 8"),
    case("jpeg-quality", f"config {T} data.jpeg_quality=101", "data.jpeg_quality=101 must be <= 100"),
    case("unknown-features", f"config {T} eval.features=clip", "eval.features='clip' is not one of"),
    case("attention-levels-count", f"config {T} model.attention_levels=[true]",
         "model.attention_levels has 1 entries but model.block_out_channels has 2"),
    case("channels-vs-groups", f"config {T} model.block_out_channels=[30,64]",
         "model.block_out_channels entry 30 is not divisible by model.norm_num_groups=8"),
    case("steps-above-T", f"config {T} sample.steps=5000", "sample.steps=5000 must be <= 1000 for sample.sampler=ddim"),
    case("guidance-interval-one-value", f"config {T} sample.guidance_interval=[5]", "sample.guidance_interval=[5]"),
    case("guidance-interval-reversed", f"config {T} sample.guidance_interval=[500,100]",
         "sample.guidance_interval=[500, 100] must be [lo, hi]"),
    case("cpu-with-gpus", f"config {T} runtime.device=cpu launch.gpus_per_worker=1",
         "runtime.device=cpu but launch.gpus_per_worker=1"),
    case("resolution-vs-vae", f"config {T} data.resolution=33", "data.resolution=33 must be divisible by the VAE"),
    case("override-without-value", f"config {T} train.max_steps", "override 'train.max_steps' is not key=value"),
    case("recipe-missing", "config F/nope.yaml", "config file F/nope.yaml does not exist"),
    case("recipe-not-yaml", "config F/broken.yaml", "F/broken.yaml: not valid YAML"),
    case("recipe-a-list", "config F/list.yaml", "F/list.yaml: the top level must be a mapping of sections"),
    case("empty-recipe", "train --config F/empty.yaml", "F/empty.yaml is empty"),
    case("section-given-a-scalar", f"train --config {T} model=5", "model must be a mapping of its keys"),
    case("unknown-signal", f"train --config {T} train.preempt_signals=[SIGTERM,SIGFOO]",
         "train.preempt_signals has ['SIGFOO']"),
    case("uncatchable-signal", f"config {T} train.preempt_signals=[SIGKILL]", "train.preempt_signals has ['SIGKILL']"),
    case("unknown-nan-policy", f"config {T} train.nan_policy=ignore", "train.nan_policy='ignore' is not one of"),
    case("zero-s3-attempts", f"config {T} s3.attempts=0", "s3.attempts=0 must be >= 1"),
    case("zero-read-timeout", f"config {T} s3.read_timeout_s=0", "s3.read_timeout_s=0.0 must be > 0.0"),
    case("eta-above-1", f"config {T} sample.eta=2", "sample.eta=2.0 must be <= 1.0"),
    case("label-dropout-above-1", f"config {T} diffusion.label_dropout=1.5", "diffusion.label_dropout=1.5"),
    case("unknown-recon-loss", f"config {T} vae.recon_loss=l3", "vae.recon_loss='l3' is not one of"),
    case("get-unknown-key", f"config {T} --get train.nope", "--get train.nope: no such key"),
    case("negative-cfg-scale-in-sweep", f"eval --config {T} eval.guidance_scales=[3,-1]",
         "eval.guidance_scales=[3.0, -1.0]: every scale must be >= 0"),
    case("too-many-steps-in-sweep", f"eval --config {T} eval.steps=[50,5000]",
         "eval.steps=[50, 5000]: every step count must be in 1..1000"),
    case("unknown-sampler-in-sweep", f"eval --config {T} eval.samplers=[ddim,euler]",
         "eval.samplers=['ddim', 'euler']: 'euler' is not a sampler"),
    case("pinned-steps-not-a-number", f"eval --config {T} eval.samplers=[ddim:many]",
         "'ddim:many': write NAME:STEPS with a whole number of steps"),
    case("pinned-steps-past-T-for-multistep", f"eval --config {T} eval.samplers=[unipc:1000]",
         "eval.samplers entry unipc:1000: unipc takes 1..999 steps"),
]

CLI = [  # the command line itself
    case("unknown-command", "frob", "dist-diffusion: argument COMMAND: invalid choice: 'frob'"),
    case("train-without-config", "train", "dist-diffusion train: the following arguments are required: --config"),
    case("prepare-without-src", "prepare --out F/o", "the following arguments are required: --src"),
    case("nproc-zero", "encode --shards F/made16 --out F/o --nproc 0", "argument --nproc: 0 must be >= 1"),
    case("nproc-negative", f"sample --config {T} --nproc -1", "argument --nproc: -1 must be >= 1"),
    case("nproc-not-a-number", f"train --config {T} --nproc abc", "argument --nproc: 'abc' is not a whole number"),
    case("unknown-stack-action", "stack frob", "dist-diffusion stack: argument action: invalid choice: 'frob'"),
]

DATA = [  # files and directories that are not what they are named as
    case("labels-file-missing", "prepare --src F/good --out F/out1 data.labels_file=F/nope.txt",
         "data.labels_file=F/nope.txt does not exist"),
    case("every-image-unreadable", "prepare --src F/junk --out F/out2",
         "--src F/junk: none of its 1 images could be read (first: a/broken.jpg"),
    case("src-missing", "prepare --src F/nowhere --out F/out3", "--src F/nowhere is not a directory"),
    case("src-a-file", "prepare --src F/a_file --out F/out4", "--src F/a_file is not a directory"),
    case("src-without-classes", "prepare --src F/emptysrc --out F/out5", "--src F/emptysrc has no class folders"),
    case("prepare-out-is-a-file", "prepare --src F/good --out F/a_file", "--out F/a_file is a file"),
    case("prepare-over-other-settings", "prepare --src F/src2 --out F/made16 data.resolution=32",
         "F/made16 holds shards prepared with other settings (data.resolution: 16 -> 32"),
    case("index-sample-without-image", "index F/idx_noimage",
         "F/idx_noimage/a-000.tar: sample 000004 has no image (.jpg/.png/.jpeg/.webp); it has .cls"),
    case("index-label-out-of-range", "index F/idx_range --num-classes 2",
         "F/idx_range/a-000.tar: label 2 is out of range for 2 classes"),
    case("index-files-of-a-key-apart", "index F/idx_unsorted",
         "F/idx_unsorted/a-000.tar: sample 000000 has files apart from each other in the tar"),
    case("index-no-shards", "index F/idx_empty", "F/idx_empty holds no .tar shards"),
    case("index-over-a-manifest", "index F/made16", "F/made16 already has a manifest.json"),
    case("index-json-label-missing", "index F/idx_range data.label_key=label",
         "sample 000000: no .json field (data.label_key=label reads the label from it)"),
    case("shards-unset", f"train --config {T} train.run_dir=F/run1", "data.shards is empty"),
    case("shards-missing", f"train --config {T} train.run_dir=F/run2 data.shards=F/nowhere",
         "F/nowhere/manifest.json not found; run `dist-diffusion prepare`"),
    case("manifest-not-json", f"train --config {T} train.run_dir=F/run3 data.shards=F/shards",
         "F/shards/manifest.json is not a manifest (not JSON"),
    case("shards-of-another-resolution", f"train --config {T} train.run_dir=F/run4 data.shards=F/made16 "
         "vae.enabled=false", "images in F/made16 are 16px but data.resolution=32"),
    case("more-classes-than-the-model", f"train --config {T} train.run_dir=F/run5 data.shards=F/made16 "
         "vae.enabled=false data.resolution=16 model.num_classes=1", "have 2 classes but model.num_classes=1"),
    case("latents-without-vae", f"train --config {T} train.run_dir=F/run6 data.shards=F/latents vae.enabled=false",
         "F/latents holds latents but vae.enabled=false"),
    case("vae-target-on-latents", f"train --config {T} train.run_dir=F/run7 data.shards=F/latents "
         "train.target=vae", "train.target=vae needs image shards"),
    case("adversarial-vae-on-zero3", f"train --config {T} train.run_dir=F/run8 data.shards=F/made16 "
         "train.target=vae vae.adversarial_weight=0.1 runtime.zero_stage=3",
         "vae.adversarial_weight=0.1 needs runtime.zero_stage 1 or 2"),
    case("run-dir-is-a-file", f"train --config {T} train.run_dir=F/a_file data.shards=F/made16",
         "train.run_dir=F/a_file is a file"),
    case("resume-with-another-model", f"train --config {T} train.run_dir=F/oldrun data.shards=F/made16 "
         "model.preset=small", "train.run_dir=F/oldrun holds checkpoints of another model (model.preset: tiny -> small"),
    case("encode-without-vae", "encode --shards F/made16 --out F/out6", "encode needs vae.pretrained"),
    case("export-no-checkpoint", "export --run-dir F/good --out F/out7", "F/good has no complete checkpoint"),
    case("unet-unset", f"sample --config {T}", "eval.unet='' is not an exported UNet directory"),
    case("unet-missing", f"eval --config {T} eval.unet=F/nowhere", "eval.unet='F/nowhere' is not an exported UNet"),
    case("vae-export-as-unet", f"sample --config {T} eval.unet=F/vae_export",
         "eval.unet='F/vae_export' is an exported AutoencoderKL, not a UNet"),
    case("unet-of-other-latents", f"sample --config {T} eval.unet=F/unet vae.block_out_channels=[32,64]",
         "eval.unet=F/unet was trained otherwise: it denoises 4x8x8 inputs, this config samples 4x16x16"),
    case("unet-of-another-schedule", f"eval --config {T} eval.unet=F/unet diffusion.snr_shift=2",
         "it learned diffusion.snr_shift=1.0, this config has 2.0; set those keys as in the run's config.yaml"),
    case("vae-of-other-latent-channels", "encode --shards F/made16 --out F/o vae.pretrained=F/vae_export "
         "vae.latent_channels=8", "vae.latent_channels=8 but the VAE in F/vae_export has 4"),
    case("latent-unet-on-images-without-vae", f"train --config {T} train.run_dir=F/run9 data.shards=F/made16 "
         "data.resolution=16", "vae.pretrained is empty: it would learn the latents of a randomly initialised VAE"),
    case("latent-unet-eval-without-vae", f"sample --config {T} eval.unet=F/unet",
         "eval.unet=F/unet denoises latents, but vae.pretrained is empty"),
    case("metrics-without-reference", f"eval --config {T} eval.unet=F/unet",
         "eval.metrics needs reference images: set eval.reference"),
    case("classifier-unset", f"eval --config {T} eval.unet=F/unet data.shards=F/made16",
         "eval.features=classifier needs eval.classifier"),
    case("vae-export-as-classifier", f"eval --config {T} eval.unet=F/unet data.shards=F/made16 "
         "eval.classifier=F/vae_export", "eval.classifier=F/vae_export is an exported AutoencoderKL, not a classifier"),
    case("inception-weights-unset", f"eval --config {T} eval.unet=F/unet data.shards=F/made16 "
         "eval.features=inception", "eval.features=inception needs eval.inception_weights"),
    case("inception-weights-missing", f"eval --config {T} eval.unet=F/unet data.shards=F/made16 "
         "eval.features=inception eval.inception_weights=F/nope.pth", "eval.inception_weights=F/nope.pth does not exist"),
    case("url-without-bucket", f"train --config {T} train.run_dir=F/run8 data.shards=s3:///x",
         "s3:///x: no bucket in the URL"),
    case("unsupported-scheme", f"train --config {T} train.run_dir=F/run9 data.shards=gs://b/x",
         "gs://b/x: only local paths and s3:// URLs are supported"),
]


def snapshot(root: Path) -> list:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("argv,code,says", CONFIG + CLI + DATA)
def test_bad_input_is_one_line_naming_the_fix(files, argv, code, says, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = snapshot(files)
    got, err = run_cli([a.replace("F/", f"{files}/") for a in argv], capsys)
    assert_one_line(got, err, code, says.replace("F/", f"{files}/"))
    assert snapshot(files) == before  # nothing created, nothing that was there changed


@pytest.fixture(scope="module")
def s3_data(files, s3_server):
    """A bucket holding shards prepared at 16 px, and endpoints that fail in two ways."""
    from dist_diffusion.config import DataConfig
    from dist_diffusion.data import storage
    from dist_diffusion.data.prepare import prepare

    storage.s3_client().create_bucket(Bucket="badinput")
    prepare(files / "src2", "s3://badinput/made16", DataConfig(resolution=16, samples_per_shard=4), progress=False)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    return {"closed": f"http://127.0.0.1:{closed}"}


S3 = [  # (id, argv, environment change, what the line says); B = s3://badinput
    ("bucket-missing", f"train --config {T} train.run_dir=F/s1 data.shards=s3://nobucket/x", {},
     "bucket 'nobucket' does not exist"),
    ("prefix-missing", f"train --config {T} train.run_dir=F/s2 data.shards=B/nothing", {},
     "B/nothing/manifest.json not found"),
    ("wrong-secret", f"train --config {T} train.run_dir=F/s3 data.shards=B/made16",
     {"AWS_SECRET_ACCESS_KEY": "wrong" * 8}, "S3 refused the credentials"),
    ("no-credentials", f"train --config {T} train.run_dir=F/s4 data.shards=B/made16",
     {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no S3 credentials found"),
    ("endpoint-closed", f"train --config {T} train.run_dir=F/s5 data.shards=B/made16 s3.attempts=1",
     {"AWS_ENDPOINT_URL": "closed"}, "cannot reach S3 at http://127.0.0.1:"),
    ("endpoint-never-answers", f"train --config {T} train.run_dir=F/s6 data.shards=B/made16 s3.attempts=1 "
     "s3.read_timeout_s=0.3", {"AWS_ENDPOINT_URL": "blackhole"}, "did not answer within s3.read_timeout_s=0.3 s"),
    ("prepare-into-missing-bucket", "prepare --src F/src2 --out s3://nobucket/x", {},
     "bucket 'nobucket' does not exist"),
    ("prepare-over-other-settings-in-s3", "prepare --src F/src2 --out B/made16 data.resolution=32", {},
     "B/made16 holds shards prepared with other settings (data.resolution: 16 -> 32"),
    ("ckpt-url-bucket-missing", f"train --config {T} train.run_dir=F/s7 data.shards=B/made16 vae.enabled=false "
     "data.resolution=16 train.ckpt_url=s3://nobucket/ckpts", {}, "s3://nobucket/ckpts: bucket 'nobucket'"),
    ("eval-out-bucket-missing", f"sample --config {T} eval.unet=F/unet eval.out=s3://nobucket/eval", {},
     "s3://nobucket/eval: bucket 'nobucket'"),
    ("encode-shards-in-missing-bucket", "encode --shards s3://nobucket/x --out F/out8 vae.pretrained=F/vae_export",
     {}, "bucket 'nobucket' does not exist"),
]


def bucket_snapshot() -> list:
    from dist_diffusion.data import storage

    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket="badinput")
    return sorted((o["Key"], o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", []))


@pytest.mark.parametrize("argv,env,says", [pytest.param(a.split(), e, s, id=i) for i, a, e, s in S3])
def test_bad_s3_input_is_one_line_naming_the_url(files, s3_data, argv, env, says, capsys, monkeypatch):
    from faulty_proxy import Blackhole

    from dist_diffusion.data import storage

    monkeypatch.chdir(ROOT)
    before, objects = snapshot(files), bucket_snapshot()
    argv = [a.replace("F/", f"{files}/").replace("B/", "s3://badinput/") for a in argv]
    with Blackhole() as hole:
        endpoints = {"closed": s3_data["closed"], "blackhole": f"http://127.0.0.1:{hole.port}"}
        for key, value in env.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, endpoints.get(value, value))
        storage.s3_client.cache_clear()
        try:
            got, err = run_cli(argv, capsys)
        finally:
            monkeypatch.undo()
            storage.configure(storage.Policy())
            storage.s3_client.cache_clear()
    assert_one_line(got, err, 2, says.replace("F/", f"{files}/").replace("B/", "s3://badinput/"))
    assert snapshot(files) == before and bucket_snapshot() == objects  # nothing changed, here or in S3


def test_the_readme_counts_the_bad_inputs_of_this_table():
    """The README's count is this table's length; no case is listed twice (by name or by
    what it runs), so each one counted is a bad input of its own."""
    names = [c.id for c in CONFIG + CLI + DATA] + [name for name, *_ in S3]
    runs = [(tuple(c.values[0]), ()) for c in CONFIG + CLI + DATA] + [(a, tuple(e.items())) for _, a, e, _ in S3]
    assert len(set(names)) == len(names) and len(set(runs)) == len(runs)
    stated = re.search(r"tests/test_bad_input\.py holds (\d+) bad\s+inputs", (ROOT / "README.md").read_text())
    assert stated and int(stated.group(1)) == len(names), f"README.md: set the count to {len(names)}"


def test_a_real_bug_is_a_traceback_with_a_line_asking_for_a_report(monkeypatch, capsys):
    from dist_diffusion import cli

    def broken(args):
        raise KeyError("an internal slip")

    monkeypatch.setattr(cli, "_cmd_config", broken)
    code, err = run_cli(["config", T], capsys)
    assert code == 1 and "Traceback" in err and "KeyError: 'an internal slip'" in err
    assert err.strip().splitlines()[-1].startswith("error: an internal error in dist-diffusion")


def test_a_data_error_from_a_loader_worker_is_its_own_line():
    from dist_diffusion.data.stream import DataError
    from dist_diffusion.errors import one_line

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\ndist_diffusion.data.stream.DataError: 9 corrupt "
                        "samples in s3://b/x, more than max_corrupt_fraction=0.01; re-run prepare\n")
    assert one_line(wrapped) == "9 corrupt samples in s3://b/x, more than max_corrupt_fraction=0.01; re-run prepare"

