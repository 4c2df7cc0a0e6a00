"""Fixtures shared by every test tree: no network, one torch thread, a private Prefect home and model cache,
a prepared sample, the OpenAI-compatible test server, a synthetic run folder, a fake Hub and a local S3."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# Before anything imports huggingface_hub or prefect.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
for secret in ("OPENAI_API_KEY", "MATHWIZARD_TEACHER_API_KEY", "HF_TOKEN"):
    os.environ.pop(secret, None)

# Prefect, transformers and datasets attach log handlers to the sys.stderr of their first import. Import them
# here, against the real stderr, so a first import inside a CliRunner (whose stream closes) cannot break later tests.
import datasets  # noqa: E402, F401
import prefect.main  # noqa: E402, F401
import pytest  # noqa: E402
import transformers  # noqa: E402, F401

from tests.publish.fakehub import TOKEN  # noqa: E402
from tests.teacher.helpers import API_KEY  # noqa: E402
from tests.training.builders import use_session_model_cache  # noqa: E402

_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "FSSPEC_S3_ENDPOINT_URL",
    "AWS_CA_BUNDLE",
)


# ------------------------------------------------------------------------------------------- session
@pytest.fixture(scope="session", autouse=True)
def _prefect_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))


@pytest.fixture(scope="session", autouse=True)
def _models_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One tiny-model cache per session (built once, ~3 s), never ~/.cache."""
    use_session_model_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def prefect_harness(_prefect_home: None):
    """One ephemeral Prefect API for the whole session (start-up costs ~6 s); use it only in flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# --------------------------------------------------------------------------------------- stage inputs
@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled 60-problem sample through the real prepare stage (train 51 / val 4 / test 5). Read-only: copy
    it before changing anything."""
    from mathwizard.config import PrepareConfig
    from mathwizard.stages import prepare

    out = tmp_path_factory.mktemp("sample") / "01-prepare"
    prepare.run(PrepareConfig(source="sample", workers=1), out)
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished synthetic run folder (01-prepare ... 06-eval) for the publish stage, its cards and its flow."""
    from tests.publish.synthetic import make_run

    return make_run(tmp_path / "run")


# ---------------------------------------------------------------------------------------------- teacher
@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", API_KEY)
    return API_KEY


@pytest.fixture
def server(api_key: str):
    """A fresh OpenAI-compatible server per test that only accepts `API_KEY`, with quick Retry-After and a `slow`
    fault of 1 s."""
    from mathwizard.testing import OpenAITestServer

    with OpenAITestServer(api_key=api_key, retry_after=0.01, slow_s=1.0) as srv:
        yield srv


# ------------------------------------------------------------------------------------------------- Hub
@pytest.fixture
def no_hub_login(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token from this machine's environment, .env or `hf auth login` may leak into a test."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MATHWIZARD_HF_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-login" / "token"))
    monkeypatch.chdir(tmp_path)  # Secrets reads .env from the working directory


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    """A Hub on 127.0.0.1 that accepts TOKEN; HF_HUB_OFFLINE is lifted for the test's duration only."""
    import huggingface_hub.constants

    from tests.publish.fakehub import FakeHub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub(token=TOKEN) as hub:
        yield hub


# -------------------------------------------------------------------------------------------------- S3
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 on 127.0.0.1 for the whole session; fsspec finds it through FSSPEC_S3_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
        }
    )
    os.environ.pop("AWS_CA_BUNDLE", None)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket as an `s3://` URL."""
    import fsspec.config
    import s3fs

    fsspec.config.set_conf_env(fsspec.config.conf)
    name = f"mw-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    return f"s3://{name}"
