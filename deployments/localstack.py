"""A local Prefect stack for `mathwizard up` and the tests: server, work pools, deployments and workers.

It lives beside `prefect.yaml` because it deploys that file from this source checkout (the deployments' pull step
runs flows from the checkout too). Everything runs as child processes of the `prefect` command line: a server on
127.0.0.1 with SQLite under its own PREFECT_HOME and analytics off, the `cpu` and `cuda` process pools (`cuda` runs
one flow at a time), the deployments of `deployments/prefect.yaml` with their schedules off unless asked, and
workers. `stop()` stops the workers first and
the server last: stopped together, the server can hang for a minute waiting on its clients.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from tenacity import retry, retry_if_result, stop_after_attempt, wait_exponential

from mathwizard.errors import ConfigError, MathWizardError, TransientError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = Path(__file__).resolve().with_name("prefect.yaml")
POOLS: dict[str, int | None] = {"cpu": None, "cuda": 1}  # pool -> concurrency limit (one GPU job at a time)
OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def prefect_command() -> list[str]:
    """The prefect CLI of this interpreter's environment (not whatever `prefect` is first on PATH)."""
    script = Path(sys.executable).with_name("prefect")
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def gpu_available() -> bool:
    """Whether a CUDA worker makes sense here; asked in a child process so this one never imports torch."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


BUSY = {429, 502, 503}  # the server's "not now": retried


@retry(
    retry=retry_if_result(lambda response: response.status_code in BUSY),
    stop=stop_after_attempt(6),
    wait=wait_exponential(multiplier=0.5, max=8),
    retry_error_callback=lambda state: state.outcome.result(),  # still busy: the last answer, raised by the caller
    reraise=True,
)
def _request_until_served(method: str, url: str, **kwargs) -> httpx.Response:
    return httpx.request(method, url, timeout=30, **kwargs)


@dataclass
class LocalStack:
    """One Prefect server and its workers, all children of this process.

    Args:
        home: PREFECT_HOME of the stack (database, profiles, logs).
        port: the server's port on 127.0.0.1 (default: a free one).
        env: extra environment for every child (e.g. PREFECT_WORKER_QUERY_SECONDS, MATHWIZARD_HOME).
        logs: folder for the children's output (default: `<home>/logs`).
    """

    home: Path
    port: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    logs: Path | None = None
    host: str = "127.0.0.1"
    server: subprocess.Popen | None = field(default=None, init=False)
    workers: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    _files: list[IO[bytes]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.port = self.port or free_port(self.host)
        self.logs = Path(self.logs or self.home / "logs")

    # ------------------------------------------------------------------------------------------ addresses
    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment of every child: this stack's home and API, offline, plus `env` and `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(OFFLINE_ENV)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_LOGGING_EXTRA_LOGGERS="mathwizard",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        env.update(extra)
        return env

    # ---------------------------------------------------------------------------------------- lifecycle
    def start_server(self, timeout: float = 120.0) -> None:
        """Start `prefect server start` and wait until /api/health answers."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        cmd = [*prefect_command(), "server", "start", "--host", self.host, "--port", str(self.port)]
        # The UI asks the API at PREFECT_UI_API_URL (default: port 4200, whatever --port says).
        self.server = self._spawn(
            cmd,
            "server",
            PREFECT_API_URL="",
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_SERVER_API_HOST=self.host,
            PREFECT_SERVER_API_PORT=str(self.port),
        )
        self.wait_healthy(timeout)
        log.info("Prefect server ready at %s", self.ui_url)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server is not None and self.server.poll() is not None:
                raise MathWizardError(
                    f"the Prefect server exited with code {self.server.returncode}; see {self.logs}/server.log"
                )
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TransientError(f"the Prefect server at {self.api_url} was not healthy within {timeout:.0f} s")

    def create_pools(self, pools: Mapping[str, int | None] = POOLS) -> None:
        """Process work pools (created when missing); a pool with a limit runs at most that many flow runs.

        Through the REST API with the process worker's own default job template (what `prefect work-pool create
        --type process` sends), not one Prefect CLI process per call."""
        from prefect.workers.process import ProcessWorker

        existing = {p["name"] for p in self.api("POST", "/work_pools/filter", json={}).json()}
        for name, limit in pools.items():
            if name not in existing:
                template = ProcessWorker.get_default_base_job_template()
                body = {"name": name, "type": "process", "base_job_template": template}
                self.api("POST", "/work_pools/", json={**body, "concurrency_limit": limit})
            elif limit is not None:
                self.api("PATCH", f"/work_pools/{name}", json={"concurrency_limit": limit})

    def deploy(self, prefect_yaml: Path = PREFECT_YAML, names: Sequence[str] = ()) -> None:
        """`prefect deploy` every deployment of the file (or those named), run from the repository root."""
        selection = [arg for name in names for arg in ("--name", name)] or ["--all"]
        self.cli("deploy", "--prefect-file", str(Path(prefect_yaml).resolve()), *selection, cwd=REPO)

    def set_schedules(self, active: bool) -> list[str]:
        """Switch every deployment schedule on or off; returns the deployments' full names that have one."""
        flows = {f["id"]: f["name"] for f in self.api("POST", "/flows/filter", json={}).json()}
        switched = []
        for deployment in self.api("POST", "/deployments/filter", json={}).json():
            for schedule in deployment.get("schedules") or []:
                path = f"/deployments/{deployment['id']}/schedules/{schedule['id']}"
                self.api("PATCH", path, json={"active": active})
                switched.append(f"{flows[deployment['flow_id']]}/{deployment['name']}")
        return sorted(set(switched))

    def start_worker(self, pool: str, *, name: str | None = None, **env: str) -> subprocess.Popen:
        """A process worker polling `pool`; its flow runs inherit `env` (e.g. CUDA_VISIBLE_DEVICES)."""
        worker_name = name or f"{pool}-{socket.gethostname()}"
        cmd = [
            *prefect_command(),
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "process",
            "--name",
            worker_name,
            "--install-policy",
            "never",
        ]
        # The deployments' pull step moves each run into MATHWIZARD_REPO: here, this checkout.
        env = {"MATHWIZARD_REPO": self.env.get("MATHWIZARD_REPO", str(REPO)), **env}
        process = self._spawn(cmd, f"worker-{pool}", cwd=REPO, **env)
        self.workers[pool] = process
        return process

    def stop(self, timeout: float = 30.0) -> None:
        """Workers first (their runs report their final state), then the server."""
        for process in self.workers.values():
            _interrupt(process)
        for process in self.workers.values():
            _wait_or_kill(process, timeout)
        self.workers.clear()
        if self.server is not None:
            _interrupt(self.server)
            _wait_or_kill(self.server, timeout)
            self.server = None
        for handle in self._files:
            handle.close()
        self._files.clear()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ helpers
    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A call to the server's REST API (raises on HTTP errors). A busy server's 429/502/503 (SQLite locked under
        load: the request was not applied) is asked again with backoff, as Prefect's own client does."""
        response = _request_until_served(method, f"{self.api_url}{path}", **kwargs)
        response.raise_for_status()
        return response

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 300.0) -> str:
        """Run `prefect <args>` against this stack; returns its output, raises with it on failure."""
        done = subprocess.run(
            [*prefect_command(), "--no-prompt", *args],
            env=self.child_env(),
            cwd=cwd or REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise ConfigError(f"`prefect {' '.join(args)}` failed with code {done.returncode}: " + " | ".join(output))
        return done.stdout

    def _spawn(self, cmd: list[str], label: str, cwd: Path | None = None, **env: str) -> subprocess.Popen:
        handle = open(self.logs / f"{label}.log", "ab")  # noqa: SIM115  (closed in stop())
        self._files.append(handle)
        child_env = self.child_env(**env)
        if not child_env.get("PREFECT_API_URL"):
            child_env.pop("PREFECT_API_URL")
        return subprocess.Popen(
            cmd,
            env=child_env,
            cwd=cwd or REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop the children in order
            preexec_fn=_default_sigint,
        )


def _default_sigint() -> None:
    """In the child, before exec: a parent started in the background ignores SIGINT, and children inherit that;
    Python then never raises KeyboardInterrupt, and neither the server nor a worker (which turns SIGTERM into
    SIGINT) would ever stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)


def _wait_or_kill(process: subprocess.Popen, timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def up(
    home: Path,
    *,
    port: int = 4200,
    prefect_yaml: Path = PREFECT_YAML,
    cuda_worker: bool | None = None,
    schedules: bool = False,
    env: Mapping[str, str] | None = None,
    announce=print,
) -> LocalStack:
    """Start the whole local stack and return it running; the caller waits and then calls `stop()`.

    Args:
        home: PREFECT_HOME of the stack.
        port: the server's port on 127.0.0.1.
        cuda_worker: start a worker on the `cuda` pool (default: when torch sees a GPU).
        schedules: switch the deployments' schedules on; off by default, whatever prefect.yaml or an earlier
            `up --schedules` left in the stack's database (the weekly run costs a download, an API and a GPU).
        env: extra environment for the workers' flow runs (e.g. MATHWIZARD_HOME).
        announce: where progress lines go.
    """
    stack = LocalStack(home=home, port=port, env=dict(env or {}))
    try:
        announce(f"starting the Prefect server on {stack.ui_url} (PREFECT_HOME={stack.home})")
        stack.start_server()
        announce("creating work pools: " + ", ".join(POOLS))
        stack.create_pools()
        announce(f"deploying {prefect_yaml}")
        stack.deploy(prefect_yaml)
        scheduled = stack.set_schedules(schedules)
        if scheduled:
            state = "on" if schedules else "off (mathwizard up --schedules switches them on)"
            announce(f"schedules of {', '.join(scheduled)}: {state}")
        stack.start_worker("cpu")
        with_cuda = gpu_available() if cuda_worker is None else cuda_worker
        if with_cuda:
            stack.start_worker("cuda")
        announce("workers: cpu" + (", cuda" if with_cuda else " (no GPU here: start a cuda worker on a GPU machine)"))
    except BaseException:
        stack.stop()
        raise
    return stack
