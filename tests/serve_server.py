"""A real `ldm-serve` process on a free loopback port, for the API and page tests, and a small HTTP client."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# one intra-op thread: on shared cores two OpenMP threads spin-wait on each other (10x slower on the demo model),
# and the CLI run that the API's images are compared with uses the same setting, so the float maths is the same
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# the one server the API and page tests share (tests/conftest.py, `serve_server`): two users, small limits
AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:pw:1").decode()}  # a colon in the password: only the first splits
MAX_PIXELS = 64 * 64
# fp32: the API's images must equal fp32 CLI images on every CPU (auto is bf16 where the CPU has native bf16)
ARGS = ["--dtype", "fp32", "--api-auth", "alice:pw:1,bob:pw2", "--queue-size", "1", "--max-steps", "1000",
        "--max-pixels", str(MAX_PIXELS), "--max-images", "4", "--max-body-mb", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log: Path
    headers: dict[str, str]  # sent with every request (credentials)
    second_model: str = ""  # shared_server(): the second listed model's --model value
    file_model: str = ""  # shared_server(): the third, a single-file checkpoint found by --models-dir

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None, timeout: float = 120) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            h = {**self.headers, **({"Content-Type": "application/json"} if data is not None else {}),
                 **(headers or {})}
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            return Reply(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
        finally:
            conn.close()

    def post(self, path: str, body: Any = None, **kw) -> Reply:
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(*args: str, headers: dict[str, str] | None = None, startup_s: float = 180,
                   env: dict[str, str] | None = None):
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ldm.serve", "--port", str(port), *args], cwd=ROOT,
                                    env={**ENV, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        server = Server(port, proc, log, headers or {})
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"ldm-serve exited with {proc.returncode}:\n{server.output()}")
                try:
                    server.get("/sdapi/v1/progress", timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"ldm-serve did not answer in {startup_s} s:\n{server.output()}")
                    time.sleep(0.3)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def shared_server():
    """The server of tests/conftest.py's `serve_server`: the demo model listed three times, the second time as a
    directory of another name (`second_model`), the third as a single-file checkpoint in --models-dir (`file_model`,
    written by ldm-convert's function), so that switching between listed models and single files are tested too."""
    from ldm.demo import MODEL_DIR
    from ldm.singlefile.save import directory_to_file

    with tempfile.TemporaryDirectory() as tmp:
        second = Path(tmp) / "shapes-copy"
        second.symlink_to(MODEL_DIR, target_is_directory=True)
        models_dir = Path(tmp) / "models"
        models_dir.mkdir()
        directory_to_file(MODEL_DIR, models_dir / "shapes-file.safetensors")
        with running_server(*ARGS, "--model", "shapes-32px-demo", "--model", str(second), "--models-dir",
                            str(models_dir), headers=AUTH) as server:
            server.second_model = str(second)
            server.file_model = str(models_dir / "shapes-file.safetensors")
            yield server
