"""``serve`` as a background process on a free loopback port, for the pipeline and the scripts: started,
waited for until it answers, and always stopped."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class ServeStartError(RuntimeError):
    """The background ``serve`` exited or did not answer in time (its log says why)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m refusal_lightning serve`` in the background on a free loopback port; always stopped."""

    def __init__(self, model: str, adapters: dict[str, Path], log_path: Path, timeout_s: float = 180,
                 max_batch_size: int = 16, extra_args: Sequence[str] = ()):
        """``extra_args``: more ``serve`` options, e.g. ``["--device", "cpu"]``."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "refusal_lightning", "serve", "--model", model,
                     "--served_model_name", "base", "--port", str(self.port), "--max_batch_size", str(max_batch_size)]
        for name, path in adapters.items():
            self.args += ["--adapter", f"{name}={path}"]
        self.args += list(extra_args)
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        import requests

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServeStartError(f"serve exited with code {self.proc.returncode}; see {self.log_path}")
                try:
                    if requests.get(f"{self.url}/v1/models", timeout=2).ok:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.5)
            raise ServeStartError(f"serve did not answer within {self.timeout_s:.0f}s; see {self.log_path}")
        except BaseException:  # a failed start, or an interrupt while waiting: never leave serve running
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
