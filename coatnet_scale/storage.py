"""fsspec access for every URL the training job touches (data, checkpoints): one place that
turns the config's `storage` section into filesystem options, applied to s3:// URLs only."""
from __future__ import annotations

import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dataprep.sources import options_for


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
    return options


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
