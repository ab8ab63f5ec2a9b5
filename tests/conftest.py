"""Shared fixtures: a real S3 endpoint (moto server mode, which pyarrow and Ray workers can
reach, unlike the in-process mock), a local HTTP file server, a ResNet18 .pdparams file, and a
private Ray temp directory for tests that start a ray.cluster_utils.Cluster."""
from __future__ import annotations

import http.server
import shutil
import tempfile
import threading
import uuid
from functools import partial
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1, stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    """Points the AWS environment at the moto server with dummy credentials; yields the name
    of a fresh, empty bucket."""
    import boto3

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket


class FileServer:
    """Serves `root` over HTTP on 127.0.0.1 and records the paths of the GET requests."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def file_server(tmp_path):
    server = FileServer(tmp_path / "served")
    server.root.mkdir()
    yield server
    server.stop()


@pytest.fixture
def private_ray_tmpdir(monkeypatch) -> str:
    """RAY_TMPDIR in a fresh directory for one test. A ray.cluster_utils.Cluster advertises
    itself in $RAY_TMPDIR/ray/ray_current_cluster, the file through which a plain ray.init()
    and Ray's own state-API lookups of every other Ray on the machine find "the" cluster
    (stfpm.own_cluster). Short: Ray's socket paths must stay under 108 characters."""
    private = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", private)
    yield private
    shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="session")
def resnet18_pdparams(tmp_path_factory) -> Path:
    """A full `paddle.vision.models.resnet18` state (random weights, random batch-norm
    statistics so that their names are exercised too), saved with paddle.save."""
    import numpy as np
    import paddle

    paddle.seed(0)
    model = paddle.vision.models.resnet18()
    rng = np.random.default_rng(0)
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith("._mean"):
            value.set_value(rng.normal(0, 0.1, value.shape).astype("float32"))
        elif name.endswith("._variance"):
            value.set_value(rng.uniform(0.5, 2.0, value.shape).astype("float32"))
    path = tmp_path_factory.mktemp("zoo") / "resnet18.pdparams"
    paddle.save(model.state_dict(), str(path))
    return path
