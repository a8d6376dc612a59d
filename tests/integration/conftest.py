"""The real stack for integration tests: a Redis server, a Celery worker process holding
the real vLLM engine on the default model, the API (as API_PROCESSES=2 processes on one
port, so every test's requests land on either) and Flower, all on free ports, started once
per session and ended by process group. Logs land in the pytest tmp folder."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import openai
import pytest
import redis as redis_lib

from common.settings import get_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from stack import Stack, free_port  # noqa: E402

MODEL = get_settings().model_name
FLOWER_AUTH = ("operator", "flower-test-secret")
CORS_ORIGIN = "https://app.example.test"
# The session stack runs with API keys: two tenants and an administrator.
ALICE_KEY = "sk-test-alice-0123456789"
BOB_KEY = "sk-test-bob-0123456789"
ADMIN_KEY = "sk-test-admin-0123456789"
API_PROCESSES = 2


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("stack-logs")
    s = Stack(
        redis_port=free_port(),
        api_port=free_port(),
        flower_port=free_port(),
        log_dir=logs,
        # The API as several processes on one port, as `make run` and compose run it.
        api_processes=API_PROCESSES,
        env={
            # Flower's login, and a browser origin allowed to call the API (CORS).
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
            "CORS_ALLOWED_ORIGINS": CORS_ORIGIN,
            "API_KEYS": f"{ALICE_KEY},{BOB_KEY}",
            "ADMIN_API_KEYS": ADMIN_KEY,
            "WORKER_SLOTS": "64",
            "BATCH_MAX_LINES": "300",
            "FILES_DIR": str(tmp_path_factory.mktemp("files")),
        },
    )
    try:
        s.start_redis()
        s.start_worker()
        s.start_api()
        s.start_flower()
        s.wait_ready(MODEL, timeout=600)
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            sys.stderr.write(
                f"--- {log.name} (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]) + "\n"
            )
        s.stop()
        raise
    yield s
    s.stop()


@pytest.fixture(scope="session")
def api_processes() -> int:
    """How many processes serve the session stack's API port."""
    return API_PROCESSES


@pytest.fixture(scope="session")
def api_key() -> str:
    """The key the `client`, `aclient` and `http` fixtures use (a tenant, not an admin)."""
    return ALICE_KEY


@pytest.fixture(scope="session")
def other_key() -> str:
    """Another tenant's key."""
    return BOB_KEY


@pytest.fixture(scope="session")
def admin_key() -> str:
    return ADMIN_KEY


@pytest.fixture(scope="session")
def client(stack: Stack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api_url + "/v1", api_key=api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def aclient(stack: Stack, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.api_url + "/v1", api_key=api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def http(stack: Stack, api_key: str):
    with httpx.Client(base_url=stack.api_url, timeout=300, headers={"Authorization": f"Bearer {api_key}"}) as c:
        yield c


@pytest.fixture(scope="session")
def flower(stack: Stack):
    """An HTTP client for the session stack's Flower, logged in (basic auth)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.flower_port}", auth=FLOWER_AUTH, timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
def flower_auth() -> tuple[str, str]:
    return FLOWER_AUTH


@pytest.fixture(scope="session")
def cors_origin() -> str:
    """The browser origin the session stack allows (CORS_ALLOWED_ORIGINS)."""
    return CORS_ORIGIN


@pytest.fixture(scope="session")
def redis(stack: Stack) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(stack.redis_url)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_settings().model_path)


@pytest.fixture(scope="session")
def model() -> str:
    return MODEL
