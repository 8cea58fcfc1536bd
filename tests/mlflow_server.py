"""A real ``mlflow server`` for tests: sqlite backend, local artifact folder, 127.0.0.1, a free port;
and a real ``mlflow models serve`` (``ModelServer``) the same way.

As a context manager::

    with MlflowServer(tmp_dir) as server:
        RunTracker(server.uri, "exp")

or as the module-scoped pytest fixture ``mlflow_server`` (one server per test module: it takes
~10 s to start). pytest's default "prepend" import mode puts ``tests/`` (which has no
``__init__.py``) on ``sys.path``, so register the fixture for all modules in ``tests/conftest.py`` with
``from mlflow_server import mlflow_server  # noqa: F401``, or import it so in one test module.

Each server is started in its own process group (both fork uvicorn workers) and
stopped by SIGTERM to that group, then SIGKILL if it lingers, so no worker outlives the tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:  # every process of the group has exited already
        pass


def _group_alive(group: int, leader: subprocess.Popen) -> bool:
    """Whether any process of the group still runs (reaping the leader, whose zombie would count)."""
    leader.poll()
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class ServedProcess:
    """A command that serves HTTP on 127.0.0.1 at a free port, with its log under ``root``, started in
    its own process group and healthy once ``GET <health_path>`` answers 200."""

    health_path = "/health"
    title = "mlflow server"

    def __init__(self, root: str | Path, startup_timeout_s: float = 90.0, port: int | None = None):
        self.root = Path(root)
        self.startup_timeout_s = startup_timeout_s
        self.port = port or free_port()  # a given port: the same server again (same root), e.g. after a crash
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / f"{self.title.replace(' ', '-')}.log"
        self._process: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}

    @staticmethod
    def _mlflow_exe() -> str:
        mlflow_exe = Path(sys.executable).parent / "mlflow"
        if not mlflow_exe.is_file():
            raise FileNotFoundError(f"no `mlflow` executable beside {sys.executable}: install mlflow in that venv")
        return str(mlflow_exe)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}{self.health_path}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(self._command(), cwd=self.root, env=self._env(), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._healthy():
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()  # its uvicorn child may have outlived it
                raise RuntimeError(f"{self.title} exited with code {code} before it was healthy; "
                                   f"{self.log_path}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.uri} not healthy after {self.startup_timeout_s:.0f} s; "
                                   f"{self.log_path}:\n{self._log_tail()}")
            time.sleep(0.25)
        return self

    def stop(self) -> None:
        """SIGTERM the process group (an mlflow server stops in ~3 s); SIGKILL what is left after 15 s."""
        if self._process is None:
            return
        process, self._process = self._process, None
        group = process.pid  # start_new_session: the server leads its own process group
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _group_alive(group, process) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(group, process):
            _signal_group(group, signal.SIGKILL)
        process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole server at once, as a crash would (no graceful shutdown)."""
        if self._process is not None:
            _signal_group(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
            self._process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class MlflowServer(ServedProcess):
    """``mlflow server`` from the same venv as the running Python, with all state under ``root``.

    ``serve_artifacts=True`` (MLflow's default) proxies artifacts over HTTP into
    ``root/artifacts``, as a remote server would; ``False`` gives experiments the local artifact
    root ``root/artifacts`` that clients write to directly (same host only).
    """

    def __init__(self, root: str | Path, serve_artifacts: bool = True, startup_timeout_s: float = 90.0,
                 port: int | None = None):
        super().__init__(root, startup_timeout_s, port)
        self.serve_artifacts = serve_artifacts
        self.backend_store_uri = f"sqlite:///{self.root.absolute() / 'mlflow.db'}"
        self.artifact_dir = self.root.absolute() / "artifacts"

    def _command(self) -> list[str]:
        artifact_args = (["--serve-artifacts", "--artifacts-destination", str(self.artifact_dir)]
                         if self.serve_artifacts else
                         ["--no-serve-artifacts", "--default-artifact-root", str(self.artifact_dir)])
        return [self._mlflow_exe(), "server", "--backend-store-uri", self.backend_store_uri, *artifact_args,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def _env(self) -> dict[str, str]:
        # Job execution (GenAI scorers) would start ~8 extra huey worker processes that tests never use.
        return {**super()._env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def start(self) -> MlflowServer:
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        return super().start()


class ModelServer(ServedProcess):
    """``mlflow models serve -m MODEL_URI --env-manager local``: MLflow's scoring server for a model
    of the registry ``tracking_uri``, in this venv, on one torch thread; ``predict`` POSTs to
    ``/invocations``."""

    health_path = "/ping"
    title = "mlflow models serve"

    def __init__(self, root: str | Path, model_uri: str, tracking_uri: str, startup_timeout_s: float = 300.0):
        super().__init__(root, startup_timeout_s)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri

    def _command(self) -> list[str]:
        return [self._mlflow_exe(), "models", "serve", "-m", self.model_uri, "--env-manager", "local",
                "--host", "127.0.0.1", "--port", str(self.port)]

    def _env(self) -> dict[str, str]:
        # The scoring server execs `uvicorn` from PATH: this venv's.
        return {**super()._env(), "MLFLOW_TRACKING_URI": self.tracking_uri, "OMP_NUM_THREADS": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def predict(self, body: dict) -> dict:
        request = urllib.request.Request(f"{self.uri}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A running ``mlflow server`` (proxied artifacts) shared by the tests of one module."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server
