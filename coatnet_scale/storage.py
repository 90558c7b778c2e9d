"""fsspec access for every URL the training job and dataprep touch (data, checkpoints, shards):
one place that turns S3 options (the config's `storage` section, or dataprep's command line)
into filesystem options, applied to s3:// URLs only, plus byte-range reads and atomic writes.

Transient S3 errors are retried inside the storage call: botocore's standard retry mode sends a
request that met throttling (503 SlowDown), another 5xx or a dropped connection again, up to
`storage.retries` attempts with jittered exponential backoff (at most 20 s apart), and s3fs
repeats a request still throttled or cut off after that up to 5 times; each retry is logged.
What still fails is `transient()`, which the failure log never counts as a repeated error."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem


# The demo corpus's one folder on a host, which every process there finds whatever its working
# directory: a job under `ray job submit --working-dir .` runs in Ray's copy of the checkout,
# which leaves out what git ignores (data/), and without it in the folder `ray start` ran in.
DEMO_DIR = os.environ.get("COATNET_SCALE_DEMO_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coatnet_scale", "demo")


def options_for(url: str, options: dict) -> dict:
    """The S3 options apply to s3:// URLs only."""
    return options if fsspec.utils.get_protocol(url) in ("s3", "s3a") else {}


def storage_options(storage) -> dict:
    """s3fs options from a StorageConfig (secrets unwrapped here and nowhere else)."""
    options: dict = {}
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    if storage.profile:
        options["profile"] = storage.profile
    if storage.region:
        options["client_kwargs"] = {"region_name": storage.region}
    for field, option in (("access_key_id", "key"), ("secret_access_key", "secret"), ("session_token", "token")):
        secret = getattr(storage, field)
        if secret is not None:
            options[option] = secret.get_secret_value()
    options["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": storage.retries}}
    _log_retries()
    return options


# Error codes of a store that is busy or briefly failing (botocore retries the same ones).
THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
             "RequestTimeout", "ServiceUnavailable", "InternalError"}


def transient(error: BaseException) -> bool:
    """Whether a storage error (or what caused it) is one that goes away by itself: S3
    throttling, a 5xx, a dropped or timed-out connection. A 4xx or a missing key is not."""
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
        dropped = (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)
    except ImportError:  # a host without the S3 client (docs/engine.md) has no S3 errors
        ClientError, dropped = (), (ConnectionError, TimeoutError)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ClientError):
            response = error.response or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500 or response.get("Error", {}).get("Code") in THROTTLED:
                return True
        if isinstance(error, dropped):
            return True
        error = error.__cause__ or error.__context__
    return False


class _RetryLines(logging.Filter):
    """botocore and s3fs say that they retry a request only at DEBUG. This filter, on their
    loggers, drops their other debug lines and passes the retry lines on as warnings, so that
    a throttled store shows in the job's log before it becomes an error."""

    LINES = {"botocore.retries.standard": "Retry needed", "s3fs": ("Client error (maybe retryable)", "Retryable error")}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        if not str(record.msg).startswith(self.LINES[record.name]):  # unformatted: cheap for the lines dropped
            return False
        record.msg, record.args = f"storage: S3 request retried: {record.getMessage()}", ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _log_retries() -> None:
    for name in _RetryLines.LINES:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.DEBUG:  # not done yet, and nobody asked for all of it
            logger.addFilter(_RetryLines())
            logger.setLevel(logging.DEBUG)


def url_to_fs(url: str, options: dict | None = None):
    """(filesystem, path) for a URL or local path; S3 options only reach S3 URLs."""
    return fsspec.core.url_to_fs(url, **options_for(url, options or {}))


def write_atomic(fs, path: str, data: bytes) -> None:
    """Publish a small file whole or not at all: on a filesystem a hidden temporary file in the
    same folder, synced, then renamed over `path`; on an object store one PUT."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # A dot-name matches no reader's pattern (Prometheus watches *.json, checkpoints a fixed name).
    fd, temporary = tempfile.mkstemp(prefix=".partial-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from another user (Prometheus)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class RangeReader:
    """A read-only stream of bytes [start, end) of a file, fetched in `chunk`-sized ranged reads
    (one GET each on an object store): nothing outside the range is requested."""

    def __init__(self, fs, path: str, start: int, end: int, chunk: int = 8 * 2**20):
        self.fs, self.path, self.position, self.end, self.chunk = fs, path, start, end, chunk
        self._buffer, self._at = b"", 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = len(self._buffer) - self._at + self.end - self.position
        parts, have = [], 0
        while True:
            take = min(n - have, len(self._buffer) - self._at)
            if take:
                parts.append(self._buffer[self._at:self._at + take])
                self._at += take
                have += take
            if have == n or self.position >= self.end:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            stop = min(self.end, self.position + max(self.chunk, n - have))
            data = self.fs.cat_file(self.path, start=self.position, end=stop)
            if len(data) != stop - self.position:
                raise EOFError(f"{self.path}: ended at byte {self.position + len(data)}, expected {stop}")
            self._buffer, self._at, self.position = data, 0, stop

    def close(self) -> None:
        self._buffer, self._at = b"", 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def file_sha256(path: str) -> str:
    """The sha256 of a local file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()
