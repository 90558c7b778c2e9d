"""Shared fixtures: free ports, and a real S3 endpoint on loopback (moto's threaded server,
as s3fs's own tests use)."""
import os
import socket

import pytest


@pytest.fixture
def unused_tcp_port() -> int:
    return _free_port()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 HTTP endpoint on 127.0.0.1 with fake credentials in the environment, so
    subprocesses (dataprep, Ray workers) reach it through the standard AWS variables."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket; returns its name."""
    import s3fs

    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir(name)
    return name
