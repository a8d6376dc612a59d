"""Configuration: the CONFIG_PATH YAML file and its precedence, CORS origins, Flower's login
(no services)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.testclient import TestClient
from pydantic import ValidationError

from common.settings import ConfigError, Settings

FIELDS = ("CONFIG_PATH", "MAX_N", "REDIS_URL", "SSE_PING_SECONDS", "CORS_ALLOWED_ORIGINS", "FLOWER_BASIC_AUTH")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the developer's environment or .env leaks in."""
    for name in FIELDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "llmq.yaml"
    path.write_text(text)
    monkeypatch.setenv("CONFIG_PATH", str(path))
    return path


def test_yaml_file_sets_settings(tmp_path, monkeypatch):
    write_config(
        tmp_path,
        "max_n: 4\nREDIS_URL: redis://yaml:6379/1\ncors_allowed_origins:\n  - https://a.example\n",
        monkeypatch,
    )
    s = Settings()
    # Keys are the settings' names, in either case.
    assert s.max_n == 4 and s.redis_url == "redis://yaml:6379/1"
    assert s.cors_allowed_origins == ["https://a.example"]
    assert s.sse_ping_seconds == 15.0  # not in the file: the default


def test_environment_beats_yaml_which_beats_dotenv(tmp_path, monkeypatch):
    write_config(tmp_path, "max_n: 4\nredis_url: redis://yaml/0\nsse_ping_seconds: 7\n", monkeypatch)
    (tmp_path / ".env").write_text("MAX_N=5\nREDIS_URL=redis://dotenv/0\nSSE_PING_SECONDS=9\nJOB_TTL_SECONDS=120\n")
    monkeypatch.setenv("MAX_N", "6")
    s = Settings()
    assert s.max_n == 6  # environment
    assert s.redis_url == "redis://yaml/0" and s.sse_ping_seconds == 7  # YAML over .env
    assert s.job_ttl_seconds == 120  # .env over the default


def test_without_config_path_only_environment_and_dotenv(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MAX_N=5\n")
    assert Settings().max_n == 5


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"CONFIG_PATH=.*nope\.yaml: no such file"):
        Settings()


@pytest.mark.parametrize(
    "text,message",
    [
        ("max_n: [1\n", "cannot read it as YAML"),
        ("- max_n\n", "expected a mapping"),
        ("max_nn: 3\nmax_n: 2\n", "unknown setting.*max_nn"),
    ],
)
def test_unusable_config_file_is_a_clear_error(tmp_path, monkeypatch, text, message):
    write_config(tmp_path, text, monkeypatch)
    with pytest.raises(ConfigError, match=message):
        Settings()


def test_empty_config_file_means_defaults(tmp_path, monkeypatch):
    write_config(tmp_path, "", monkeypatch)
    assert Settings().max_n == 16


def test_yaml_values_are_validated(tmp_path, monkeypatch):
    write_config(tmp_path, "max_n: 0\n", monkeypatch)
    with pytest.raises(ValidationError, match="max_n"):
        Settings()


def test_cors_origins_from_environment(monkeypatch):
    assert Settings().cors_allowed_origins == []
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", " https://a.example, http://localhost:3000/ ,,")
    assert Settings().cors_allowed_origins == ["https://a.example", "http://localhost:3000"]
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", "")
    assert Settings().cors_allowed_origins == []
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", "*")
    assert Settings().cors_allowed_origins == ["*"]


def test_cors_origins_from_yaml_string_or_list(tmp_path, monkeypatch):
    write_config(tmp_path, "cors_allowed_origins: https://a.example,https://b.example\n", monkeypatch)
    assert Settings().cors_allowed_origins == ["https://a.example", "https://b.example"]
    write_config(tmp_path, "cors_allowed_origins: [https://a.example, 'https://b.example:8443']\n", monkeypatch)
    assert Settings().cors_allowed_origins == ["https://a.example", "https://b.example:8443"]


@pytest.mark.parametrize("origin", ["app.example.com", "https://a.example/path", "ftp://a.example"])
def test_cors_origin_must_be_an_origin(monkeypatch, origin):
    monkeypatch.setenv("CORS_ALLOWED_ORIGINS", origin)
    with pytest.raises(ValidationError, match="not an origin"):
        Settings()


def test_flower_basic_auth(monkeypatch):
    assert Settings().flower_basic_auth is None
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "")
    assert Settings().flower_basic_auth is None
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:s3cret,viewer:pw:with:colons")
    s = Settings()
    assert s.flower_basic_auth is not None and "s3cret" not in repr(s)
    assert s.flower_basic_auth.get_secret_value() == "ops:s3cret,viewer:pw:with:colons"
    for bad in ("ops", "ops:", ":pw", "ops:pw,"):
        monkeypatch.setenv("FLOWER_BASIC_AUTH", bad)
        with pytest.raises(ValidationError, match="user:password"):
            Settings()


def test_cors_middleware_only_when_origins_are_configured():
    from api.main import create_app

    assert not any(m.cls is CORSMiddleware for m in create_app(Settings()).user_middleware)
    app = create_app(Settings(cors_allowed_origins=["https://a.example"]))
    # The lifespan (Redis) does not run: a preflight is answered by the middleware alone.
    client = TestClient(app)
    resp = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "https://a.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "https://a.example"
    assert "authorization" in resp.headers["access-control-allow-headers"].lower()
    resp = client.get("/openapi.json", headers={"Origin": "https://a.example"})
    assert resp.headers["access-control-allow-origin"] == "https://a.example"
    exposed = resp.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "retry-after" in exposed and "x-ratelimit-reset-tokens" in exposed
    refused = client.options(
        "/v1/chat/completions",
        headers={"Origin": "https://other.example", "Access-Control-Request-Method": "POST"},
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_a_worker_holds_as_many_jobs_as_its_engine_batches_by_default(monkeypatch):
    # With fewer slots than the engine's batch limit (max_num_seqs), jobs waited in the
    # queue while the engine had room: 64 slots (and 256 sequences) under Poisson arrivals
    # near the engine's rate gave queue waits of 1 to 1.9 s at p99 (bench_vllm_client.py
    # --with-serve --request-rate 4); with 256, under 20 ms.
    from worker.engine import max_num_seqs

    monkeypatch.delenv("WORKER_SLOTS", raising=False)
    settings = Settings()
    assert settings.worker_slots == max_num_seqs(settings) == 256
