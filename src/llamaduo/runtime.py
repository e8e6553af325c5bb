"""The runtimes an exported artifact is served by, each started in a child process on 127.0.0.1.

- llama.cpp: llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) on a GGUF,
  with the chat template embedded in the GGUF's metadata (no `--chat_format`: what Ollama and
  llama.cpp users get is what is judged);
- `llamaduo serve` on the merged Hugging Face directory.

A child process keeps the measurement honest: its peak RSS is the server's alone, and a crash in
native code is the server's failure, not ours.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llamaduo.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class Runtime:
    """A server in a child process; `with` starts it and waits until it lists its model."""

    def __init__(self, label: str, cmd: list[str], port: int, model: str, extra_body: dict[str, Any] | None = None,
                 startup_s: float = 600, dialect: str = "openai"):
        self.label, self.cmd, self.port, self.model = label, cmd, port, model
        self.extra_body = extra_body
        self.dialect = dialect  # how its server takes a response schema (`accept.request_of`)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.startup_s = startup_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server, closed in __exit__

    def __enter__(self) -> Runtime:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"{self.label} exited with {self.proc.returncode} while starting: {self.last_line()}")
            try:
                reply = httpx.get(f"{self.base_url}/models", timeout=2)
                if reply.status_code == 200:
                    self.model = self.model or reply.json()["data"][0]["id"]
                    return self
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.3)
        self.__exit__()
        raise UserError(f"{self.label} did not answer on {self.base_url} within {self.startup_s:.0f}s: {self.last_line()}")

    def last_line(self) -> str:
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "no output"

    def peak_rss_mb(self) -> float | None:
        """The server process's high-water resident memory (Linux /proc; None elsewhere)."""
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def llamacpp(gguf: Path, n_ctx: int, top_k: int | None = None, threads: int | None = None,
             lora: Path | None = None) -> Runtime:
    """llama.cpp's server on one GGUF (with `lora`, a GGUF LoRA applied over it). The request carries
    the run's sampling: llama.cpp's own defaults (repeat penalty 1.1, min_p 0.05, top_k 40) are
    switched off as transformers has none."""
    if not llama_cpp_available():
        raise UserError("the llama.cpp runtime needs llama-cpp-python: pip install 'llamaduo[interop]'")
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--model_alias", gguf.stem]
    cmd += ["--lora_path", str(lora)] if lora is not None else []
    extra = {"top_k": int(top_k or 0), "min_p": 0.0, "repeat_penalty": 1.0}
    label = f"llama.cpp server on {gguf.name}" + (f" with {lora.name}" if lora is not None else "")
    return Runtime(label, cmd, port, gguf.stem, extra, dialect="llama.cpp")


def llamaduo_serve(run_dir: Path) -> Runtime:
    """`llamaduo serve` on the run's merged model, as a user would start it."""
    port = free_port()
    cmd = [sys.executable, "-m", "llamaduo.cli", "serve", str(run_dir), "--port", str(port)]
    return Runtime("llamaduo serve", cmd, port, "")
