"""Streaming shards from a real S3: coverage, balance, order, exact resume."""

import collections
import contextlib
import random

import pytest
import torch

from conftest import make_class_folders
from dist_diffusion.config import DataConfig
from dist_diffusion.data.prepare import prepare
from dist_diffusion.data.stream import (DataError, Position, ShardStream, StreamSpec,
                                        batches_per_epoch, load_manifest)


@pytest.fixture(scope="module")
def shards_url(tmp_path_factory, s3_server):
    from dist_diffusion.data import storage

    storage.s3_client().create_bucket(Bucket="stream-data")
    src = make_class_folders(tmp_path_factory.mktemp("src"), classes=5, per_class=41)
    url = "s3://stream-data/train"
    prepare(src, url, DataConfig(resolution=16, samples_per_shard=23, prepare_workers=2), progress=False)
    return url  # 205 samples in 9 shards of up to 23


def keys_of(spec, position=None, limit=None):
    loader = torch.utils.data.DataLoader(ShardStream(spec, position), batch_size=None,
                                         num_workers=spec.num_workers)
    out = []
    for i, batch in enumerate(loader):
        if limit is not None and i == limit:
            break
        out.append(batch["key"])
    return out


def spec(url, **kw):
    return StreamSpec(url=url, batch_size=8, **{"num_workers": 2, "seed": 3} | kw)


def test_two_ranks_two_workers_cover_every_sample_once_with_equal_counts(shards_url):
    manifest = load_manifest(shards_url)
    per_rank = [sum(keys_of(spec(shards_url, rank=r, world_size=2)), []) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 205 // 2
    seen = per_rank[0] + per_rank[1]
    assert len(set(seen)) == len(seen) == 204  # one sample (205 mod 2) dropped this epoch
    assert len(keys_of(spec(shards_url, rank=0, world_size=2))) == batches_per_epoch(manifest, spec(shards_url, world_size=2))


def test_epochs_differ_and_are_reproducible(shards_url):
    s = spec(shards_url)
    e0, e0_again, e1 = (sum(keys_of(s, Position(epoch=e)), []) for e in (0, 0, 1))
    assert e0 == e0_again and e0 != e1 and sorted(e0) == sorted(e1)
    assert sum(keys_of(spec(shards_url, seed=4)), []) != e0


def test_batches_are_images_and_labels(shards_url):
    loader = torch.utils.data.DataLoader(ShardStream(spec(shards_url, num_workers=1)), batch_size=None)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].tolist() and set(batch["label"].tolist()) <= set(range(5))


@pytest.mark.parametrize("consumed", [1, 4, 7])
def test_restored_position_continues_the_uninterrupted_sequence(shards_url, consumed):
    s = spec(shards_url, rank=1, world_size=2)
    full = keys_of(s, Position(epoch=2))
    rest = keys_of(s, Position(epoch=2, batches=consumed))
    assert full[consumed:] == rest


def test_restore_does_not_download_consumed_shards(shards_url, monkeypatch):
    from dist_diffusion.data import stream

    fetched = collections.Counter()
    real = stream.fetch_shard

    def counting(spec_, entry, stats):
        fetched[entry["name"]] += 1
        return real(spec_, entry, stats)

    monkeypatch.setattr(stream, "fetch_shard", counting)
    s = spec(shards_url, num_workers=1)
    ds = ShardStream(s, Position(batches=20))  # 205 samples, batch 8: 26 batches; skip 20
    list(iter(ds))
    assert 0 < len(fetched) <= 3 and max(fetched.values()) == 1


def test_corrupt_samples_are_skipped_then_fail_past_threshold(shards_url, monkeypatch):
    from dist_diffusion.data import stream

    real = stream.parse_tar

    def corrupt_some(data):
        samples = real(data)
        for sample in samples[::10]:
            for ext in stream.IMAGE_EXTS:
                if ext in sample:
                    sample[ext] = b"garbage"
        return samples

    monkeypatch.setattr(stream, "parse_tar", corrupt_some)
    ds = ShardStream(spec(shards_url, num_workers=1, max_corrupt_fraction=0.5))
    total = sum(len(b["key"]) for b in ds)
    assert ds.stats["corrupt"] > 0 and total == 205 - ds.stats["corrupt"]
    strict = ShardStream(spec(shards_url, num_workers=1, max_corrupt_fraction=0.01))
    with pytest.raises(DataError, match="corrupt samples.*max_corrupt_fraction=0.01"):
        list(strict)


def test_missing_prefix_fails_at_start(s3_server, shards_url):
    from dist_diffusion.data.storage import StorageError

    with pytest.raises(StorageError, match="manifest.json not found"):
        ShardStream(spec("s3://stream-data/nothing-here"))


def test_s3_faults_make_the_stream_slower_not_different(shards_url, s3_server, monkeypatch):
    from faulty_proxy import FaultyProxy

    from dist_diffusion.data import storage

    s = spec(shards_url, num_workers=0)
    clean = list(ShardStream(s))
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with FaultyProxy(port, cut_every=1, cut_after=40_000, slowdown_every=5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        storage.s3_client.cache_clear()
        try:
            faulty_stream = ShardStream(s, manifest=load_manifest(shards_url))
            faulty = list(faulty_stream)
        finally:
            monkeypatch.undo()
            storage.s3_client.cache_clear()
    assert proxy.cuts > 0 and proxy.slowdowns > 0 and faulty_stream.stats["retries"] > 0
    assert [b["key"] for b in faulty] == [b["key"] for b in clean]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(faulty, clean))


def test_local_shard_cache_serves_the_second_epoch(shards_url, tmp_path, monkeypatch):
    from dist_diffusion.data import stream

    s = spec(shards_url, num_workers=0, cache_dir=str(tmp_path / "cache"))
    first = [b["key"] for b in ShardStream(s)]
    manifest = load_manifest(shards_url)
    monkeypatch.setattr(stream.storage, "read_bytes", lambda *a, **k: pytest.fail("downloaded despite the cache"))
    assert [b["key"] for b in ShardStream(s, manifest=manifest)] == first
    assert len(list((tmp_path / "cache").rglob("*.tar"))) == 9


@pytest.mark.parametrize("workers,start", [(0, Position()), (2, Position()), (3, Position(epoch=1, batches=7))])
def test_one_loader_across_epochs_equals_one_loader_per_epoch(shards_url, workers, start):
    """Training keeps one DataLoader (its workers live on across epoch ends); the batches,
    epoch by epoch, must be exactly those of a fresh loader per epoch from the same position."""
    s = spec(shards_url, rank=1, world_size=2, num_workers=workers)  # 102 samples per rank: 13 batches
    expected, position = [], start
    for _ in range(3):
        expected += [(position.epoch, keys) for keys in keys_of(s, position)]
        position = Position(position.epoch + 1, 0)
    loader = torch.utils.data.DataLoader(ShardStream(s, start, epochs=None), batch_size=None, num_workers=workers)
    got = []
    for batch in loader:
        got.append((batch["epoch"], batch["key"]))
        if len(got) == len(expected):
            break
    assert got == expected


@pytest.fixture
def s3_policy():
    """Set this process's S3 policy for one test; the defaults come back afterwards."""
    from types import SimpleNamespace

    from dist_diffusion.data import storage

    def apply(**kw):
        storage.configure(SimpleNamespace(**{**vars(storage.Policy()), **kw}))
        storage.s3_client.cache_clear()

    yield apply
    storage.configure(storage.Policy())
    storage.s3_client.cache_clear()


@contextlib.contextmanager
def endpoint(monkeypatch, port):
    from dist_diffusion.data import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage.s3_client.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        storage.s3_client.cache_clear()


@pytest.fixture(scope="module")
def one_mb_object(s3_server, shards_url):
    from dist_diffusion.data import storage

    data = random.Random(7).randbytes(1 << 20)
    storage.s3_client().put_object(Bucket="stream-data", Key="blobs/one-mb", Body=data)
    return storage.parse("s3://stream-data/blobs/one-mb"), data


def test_a_connection_cut_every_64_kb_still_delivers_a_1_mb_object(s3_server, one_mb_object, monkeypatch):
    """Only tries that received nothing count against s3.attempts (3): sixteen breaks that
    each delivered bytes do not use it up."""
    from faulty_proxy import FaultyProxy

    from dist_diffusion.data import storage

    loc, data = one_mb_object
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    stats = {}
    with FaultyProxy(port, cut_every=1, cut_after=64 * 1024, slowdown_every=0) as proxy, \
            endpoint(monkeypatch, proxy.port):
        got = storage.read_bytes(loc, stats)
    assert got == data
    assert proxy.cuts >= 15 and stats["retries"] >= 15 > storage.Policy().attempts


def test_a_stalled_download_is_abandoned_at_the_read_timeout_and_resumed(s3_server, one_mb_object,
                                                                         monkeypatch, s3_policy):
    """The proxy stalls the first 3 connections after 100 kB each (more than one 64 kB chunk
    of the reader's, so each try gains bytes), however slow the machine: the download waits
    out the read timeout on each (no less), resumes where it stood, and ends whole. Each failed try is a retry the stream records and costs one connection; a
    loaded machine may add failed tries of its own (a healthy read slower than 0.5 s), so
    the retries are checked against the connections the proxy saw, not a fixed number."""
    from faulty_proxy import FaultyProxy

    from conftest import wait_until
    from dist_diffusion.data import storage

    s3_policy(read_timeout_s=0.5)
    loc, data = one_mb_object
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    stats = {}
    with FaultyProxy(port, cut_every=0, cut_after=100_000, slowdown_every=0, stalls=3) as proxy, \
            endpoint(monkeypatch, proxy.port):
        got = storage.read_bytes(loc, stats)
        waited = wait_until(lambda: len(proxy.abandoned_after_s) == 3 and proxy.abandoned_after_s, 30,
                            "the proxy to see the client close each stalled connection", interval=0.05)
    assert got == data and proxy.stalled == 3 and proxy.cuts == 0
    assert min(waited) >= 0.5 - 0.05, waited  # given up at the read timeout, not before
    assert stats["retries"] == proxy.connections - 1 >= 3, (stats, proxy.connections)


def test_an_endpoint_that_never_answers_fails_after_s3_attempts_tries_naming_the_key(monkeypatch, s3_policy):
    """One retry layer: a request is tried exactly s3.attempts times (botocore's retries for
    single requests, ours for downloads), then one error names the timeout key."""
    from faulty_proxy import Blackhole

    from dist_diffusion.data import storage

    s3_policy(read_timeout_s=0.3, attempts=2)
    for call in (lambda: storage.check_bucket("s3://any/x"),
                 lambda: storage.read_bytes(storage.parse("s3://any/x/shard.tar"))):
        with Blackhole() as hole, endpoint(monkeypatch, hole.port):
            with pytest.raises(storage.StorageError, match=r"did not answer within s3\.read_timeout_s=0\.3 s "
                                                           r"in 2 tries") as err:
                call()
            assert hole.connections == 2
        assert f"127.0.0.1:{hole.port}" in str(err.value)


def test_default_s3_policy_gives_up_on_a_dead_endpoint_within_a_minute():
    from dist_diffusion.config import S3Config
    from dist_diffusion.data import storage

    defaults = storage.Policy()
    assert vars(defaults) == {f: getattr(S3Config(), f) for f in vars(defaults)}  # one set of defaults
    assert defaults.worst_case_s() <= 60


def test_restoring_a_1_gb_checkpoint_file_from_s3_streams_it_to_disk(s3_server, shards_url, tmp_path):
    """The file goes to disk in chunks (storage.get_file, what checkpoint restore uses): the
    restoring process's peak RSS grows by far less than the file, and the bytes match."""
    import hashlib
    import os
    import subprocess
    import sys

    from dist_diffusion.data import storage

    big, block = tmp_path / "mp_rank_00_model_states.pt", os.urandom(1 << 20)
    with open(big, "wb") as f:
        for i in range(1024):  # 1 GiB: distinct 1 MiB blocks, cheap to write
            f.write(i.to_bytes(8, "little") + block[8:])
    loc = storage.parse("s3://stream-data/ckpt/step00000001/mp_rank_00_model_states.pt")
    storage.put_file(big, loc)
    # VmHWM, the peak RSS of this process image (getrusage's maxrss would carry the forked
    # pytest's over exec), against VmRSS once the client and the imports are in memory
    probe = (
        "from pathlib import Path\n"
        "from dist_diffusion.data import storage\n"
        "def status_mb(field):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "storage.s3_client(streaming=True)\n"
        "before = status_mb('VmRSS')\n"
        f"storage.get_file(storage.parse({str(loc)!r}), Path({str(tmp_path / 'restored')!r}))\n"
        "print(status_mb('VmHWM') - before)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    growth_mb = float(done.stdout.split()[-1])
    assert growth_mb < 100, f"peak RSS grew by {growth_mb:.0f} MB while restoring a 1 GB file"

    def sha(path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        return digest.hexdigest()
    assert sha(tmp_path / "restored") == sha(big)
    storage.delete(loc)


@pytest.mark.parametrize("size", [300_000, 9 << 20], ids=["one-put", "multipart"])
def test_an_upload_corrupted_in_transit_is_refused_by_its_checksum_and_nothing_is_stored(
        s3_server, shards_url, tmp_path, monkeypatch, size):
    """Integrity comes from the CRC32 botocore sends with every body and the server checks
    (valid under SSE-KMS/SSE-C too, where the ETag is no MD5), not from ETag = MD5."""
    import os

    from faulty_proxy import FaultyProxy

    from dist_diffusion.data import storage

    local, loc = tmp_path / "blob", storage.parse(f"s3://stream-data/uploads/blob-{size}")
    local.write_bytes(os.urandom(size))
    port = int(s3_server.endpoint.rsplit(":", 1)[1])
    with FaultyProxy(port, cut_every=0, slowdown_every=0, flip_upload_byte=100_000) as proxy, \
            endpoint(monkeypatch, proxy.port):
        with pytest.raises(storage.StorageError, match=r"corrupted in transit and nothing was stored; rerun"):
            storage.put_file(local, loc)
    assert proxy.flips >= 1 and not storage.exists(loc)
    storage.put_file(local, loc)  # the same upload without the fault lands whole, checksum stored
    head = storage.s3_client().head_object(Bucket=loc.bucket, Key=loc.key, ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32") and storage.read_bytes(loc) == local.read_bytes()
    storage.delete(loc)
