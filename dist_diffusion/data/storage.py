"""Object storage behind one small API: a local directory or ``s3://bucket/prefix``.

S3 goes through boto3 with the standard credential chain (env, profile, instance role)
and ``AWS_ENDPOINT_URL`` for any S3 (SeaweedFS, MinIO). Uploads are multipart above
8 MiB and carry a CRC32 of every request body (botocore's flexible checksums), which the
server checks before it stores anything; unlike comparing the ETag with a local MD5, that
holds under SSE-KMS and SSE-C, where the ETag is no MD5. Local writes go to a temporary
name and are renamed, so a reader never sees half an object.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

PART_SIZE = 8 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage problem a user can fix; the message names the URL and the fix."""


@dataclass(frozen=True)
class Location:
    """A parsed URL: ``bucket`` is empty for a local path."""

    bucket: str
    key: str

    @property
    def is_s3(self) -> bool:
        return bool(self.bucket)

    def join(self, name: str) -> "Location":
        key = f"{self.key.rstrip('/')}/{name}" if self.key else name
        return Location(self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.is_s3 else self.key


def parse(url: str | os.PathLike) -> Location:
    url = str(url)
    if url.startswith("s3://"):
        bucket, _, key = url[5:].partition("/")
        if not bucket:
            raise StorageError(f"{url}: no bucket in the URL; write s3://BUCKET/prefix")
        return Location(bucket, key.rstrip("/"))
    if "://" in url:
        raise StorageError(f"{url}: only local paths and s3:// URLs are supported")
    return Location("", url)


@dataclass(frozen=True)
class Policy:
    """Time limits and tries of S3 requests (the config's ``s3`` section). There is one retry
    layer per request: botocore retries single requests (``attempts`` in total); downloads
    use a client without retries and our own loop, which resumes at the byte it reached and
    counts only the tries that received nothing."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 12.0
    attempts: int = 3

    def worst_case_s(self) -> float:
        """The longest a request to a dead endpoint takes before it fails: every try waits
        out both timeouts, plus the longest back-off between tries (botocore's standard
        mode: up to 2^(n-1) s before retry n, capped at 20 s; ours is shorter)."""
        backoff = sum(max(min(2.0 ** (n - 1), 20.0), _backoff_s(n)) for n in range(1, self.attempts))
        return self.attempts * (self.connect_timeout_s + self.read_timeout_s) + backoff


_policy = Policy()


def configure(s3) -> None:
    """Set this process's policy from the config's ``s3`` section (call once per command)."""
    global _policy
    _policy = Policy(float(s3.connect_timeout_s), float(s3.read_timeout_s), int(s3.attempts))


def s3_client(streaming: bool = False):
    """One client per process and policy: boto3 clients are thread-safe but not fork-safe (a
    forked dataloader worker would share its parent's sockets), so the cache is keyed by PID.
    ``streaming``: the client of downloads, which retry in :func:`read_bytes` instead."""
    return _client_for(os.getpid(), _policy, streaming)


def _clear_client_cache() -> None:
    """Forget clients, e.g. after the AWS_* environment changed."""
    _client_for.cache_clear()


s3_client.cache_clear = _clear_client_cache  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def _client_for(pid: int, policy: Policy, streaming: bool):
    import boto3
    import botocore.session
    from botocore.config import Config as BotoConfig

    tries = 1 if streaming else policy.attempts
    config = BotoConfig(retries={"total_max_attempts": tries, "mode": "standard"},
                        connect_timeout=policy.connect_timeout_s, read_timeout=policy.read_timeout_s,
                        max_pool_connections=32)
    # A session of its own: the default session caches credentials from the first client
    # on, so a changed environment would never be read again. The service models are
    # shared: parsing them is most of a new client's 0.1 s, paid by every loader worker.
    session = botocore.session.Session()
    session.register_component("data_loader", _service_models())
    return boto3.session.Session(botocore_session=session).client("s3", config=config)


@functools.cache
def _service_models():
    """botocore's loader of service models (JSON it caches once parsed); forked workers inherit it warm."""
    from botocore.loaders import create_loader

    return create_loader()


# What S3 answers when a request body does not match the checksum sent with it.
CORRUPTED_IN_TRANSIT = ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum")
UPLOAD_CHECKSUM = {"ChecksumAlgorithm": "CRC32"}  # explicit: not left to botocore's default or AWS_* env


def _backoff_s(failures: int) -> float:
    return min(0.1 * 2 ** failures, 5.0)


def explain(err: Exception, loc: Location) -> StorageError:
    """Turn a botocore error into one sentence with the fix."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, ReadTimeoutError)

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    if isinstance(err, (ReadTimeoutError, ConnectTimeoutError)):
        which = "s3.read_timeout_s" if isinstance(err, ReadTimeoutError) else "s3.connect_timeout_s"
        return StorageError(f"{loc}: S3 at {endpoint} did not answer within {which}="
                            f"{getattr(_policy, which[3:])} s in {_policy.attempts} tries (s3.attempts); "
                            f"check that the endpoint is up and reachable, or raise {which}")
    if isinstance(err, NoCredentialsError):
        return StorageError(f"{loc}: no S3 credentials found; export AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (for the local stack: `dist-diffusion stack up`)")
    if isinstance(err, EndpointConnectionError):
        return StorageError(f"{loc}: cannot reach S3 at {endpoint}; start it (`dist-diffusion stack "
                            f"up`) or set AWS_ENDPOINT_URL")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            return StorageError(f"{loc}: bucket {loc.bucket!r} does not exist; create it "
                                f"(`aws s3 mb s3://{loc.bucket}`) or fix the URL")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{loc}: S3 refused the credentials ({code}); check "
                                f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for {endpoint}")
        if code in CORRUPTED_IN_TRANSIT:
            return StorageError(f"{loc}: S3 refused the upload ({code}): the bytes it received do not match their "
                                f"checksum, so they were corrupted in transit and nothing was stored; rerun the "
                                f"command (finished work is kept)")
        return StorageError(f"{loc}: S3 error {code}: {err}")
    return StorageError(f"{loc}: {err}")


def check_bucket(url: str) -> Location:
    """Fail early, with the fix, when the bucket is missing or the credentials are wrong."""
    loc = parse(url)
    if loc.is_s3:
        try:
            s3_client().head_bucket(Bucket=loc.bucket)
        except Exception as err:  # botocore raises several unrelated types
            raise explain(err, loc) from None
    return loc


def exists(loc: Location) -> bool:
    if not loc.is_s3:
        return Path(loc.key).exists()
    from botocore.exceptions import ClientError

    try:
        s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise explain(err, loc) from None


def read_bytes(loc: Location, stats: dict | None = None) -> bytes:
    """The whole object, in memory (shards, sidecars; for files that may run to GBs, such as
    checkpoints, use :func:`get_file`). ``stats["retries"]`` counts retries."""
    if not loc.is_s3:
        return Path(loc.key).read_bytes()
    buf = bytearray()
    _download(loc, buf.extend, lambda: len(buf), stats)
    return bytes(buf)


def get_file(loc: Location, local: Path, stats: dict | None = None) -> None:
    """Copy ``loc`` to the local file ``local``, streamed: memory holds one 64 KB chunk
    whatever the size. Written beside it and renamed, so a broken copy never passes for a
    finished one."""
    def fill(tmp: Path) -> None:
        if not loc.is_s3:
            shutil.copyfile(loc.key, tmp)
            return
        with open(tmp, "wb") as f:
            _download(loc, f.write, f.tell, stats)
    _atomic_local(Path(local), fill)


def _download(loc: Location, write, written, stats: dict | None) -> None:
    """Every byte of the object through ``write``; ``written()`` is the count so far. A
    transfer broken mid-way (reset, stall past the read timeout, 5xx) is retried with
    back-off and continues at the byte it reached (HTTP Range), so nothing is lost or
    duplicated. Only tries that received no byte count against ``s3.attempts``: a
    connection that breaks every 64 KB still finishes."""
    failures, size = 0, None
    while size is None or written() < size:
        reached = written()
        try:
            reply = s3_client(streaming=True).get_object(Bucket=loc.bucket, Key=loc.key, Range=f"bytes={reached}-")
            size = size if size is not None else _total_size(reply)
            for chunk in reply["Body"].iter_chunks(1 << 16):
                write(chunk)
        except Exception as err:  # resets, timeouts, 5xx: botocore raises many types
            failures = 0 if written() > reached else failures + 1
            if stats is not None:
                stats["retries"] = stats.get("retries", 0) + 1
            if failures >= _policy.attempts or _is_permanent(err):
                raise explain(err, loc) from None
            time.sleep(_backoff_s(failures))


def _total_size(reply: dict) -> int:
    """Object size from 'Content-Range: bytes 0-99/1234' (or Content-Length for a 200)."""
    content_range = reply.get("ContentRange") or ""
    return int(content_range.rsplit("/", 1)[1]) if "/" in content_range else int(reply["ContentLength"])


def _is_permanent(err: Exception) -> bool:
    """4xx answers (missing key, refused credentials) will not heal by retrying."""
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
    return 400 <= status < 500 and status not in (408, 429)


def write_bytes(loc: Location, data: bytes) -> None:
    if not loc.is_s3:
        _atomic_local_write(Path(loc.key), data)
        return
    try:
        s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **UPLOAD_CHECKSUM)
    except Exception as err:
        raise explain(err, loc) from None


def delete(loc: Location) -> None:
    if not loc.is_s3:
        Path(loc.key).unlink(missing_ok=True)
        return
    try:
        s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as err:
        raise explain(err, loc) from None


def list_names(prefix: Location) -> list[str]:
    """Names (relative to ``prefix``) of every object under it, sorted."""
    if not prefix.is_s3:
        root = Path(prefix.key)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    names, base = [], prefix.key.rstrip("/") + "/" if prefix.key else ""
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=base):
            names += [obj["Key"][len(base):] for obj in page.get("Contents", [])]
    except Exception as err:
        raise explain(err, prefix) from None
    return sorted(names)


def put_file(local: Path, loc: Location) -> None:
    """Copy a finished local file to ``loc``, streamed. For S3 every part carries its CRC32
    and the server refuses a part whose bytes do not match it, so a stored object is whole."""
    if not loc.is_s3:  # streamed: checkpoint files and sample archives run to GBs
        _atomic_local(Path(loc.key), lambda tmp: shutil.copyfile(local, tmp))
        return
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
    try:
        s3_client().upload_file(str(local), loc.bucket, loc.key, ExtraArgs=UPLOAD_CHECKSUM, Config=transfer)
    except S3UploadFailedError as err:  # wraps the botocore error of the part that failed
        raise explain(err.__cause__ or err.__context__ or err, loc) from None
    except Exception as err:
        raise explain(err, loc) from None


def _atomic_local_write(path: Path, data: bytes) -> None:
    _atomic_local(path, lambda tmp: tmp.write_bytes(data))


def _atomic_local(path: Path, fill) -> None:
    """``fill(tmp)`` writes a file beside ``path``, which then replaces it: a reader never
    sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fill(tmp)
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """The sha256 of a local file, read in 1 MiB blocks (shards and weights run to GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
