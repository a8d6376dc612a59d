"""Service settings, read by both API and workers from the environment, the YAML file named
by CONFIG_PATH, and a `.env` file (in that order of precedence)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class ConfigError(RuntimeError):
    """The configuration file (CONFIG_PATH) is missing or unusable."""


# A browser's Origin header: scheme://host[:port], nothing after.
_ORIGIN = re.compile(r"https?://[^/\s?#]+")


def _yaml_source(settings_cls: type[BaseSettings], path: Path) -> YamlConfigSettingsSource:
    """The settings in the YAML file `path` (CONFIG_PATH), checked: it exists, parses to
    a mapping, and names only known settings (a typo must not pass unnoticed)."""
    if not path.is_file():
        raise ConfigError(f"CONFIG_PATH={path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"CONFIG_PATH={path}: cannot read it as YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"CONFIG_PATH={path}: expected a mapping of setting: value, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if str(k).lower() not in settings_cls.model_fields)
    if unknown:
        raise ConfigError(f"CONFIG_PATH={path}: unknown setting(s): {', '.join(unknown)}")
    return YamlConfigSettingsSource(settings_cls, yaml_file=path)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    redis_url: str = "redis://localhost:6379/0"
    # Connections one process keeps to Redis; a command finding all busy waits this long.
    redis_max_connections: int = Field(default=256, ge=4)
    redis_pool_timeout_seconds: float = Field(default=20.0, gt=0)
    # TLS, for a `rediss://` REDIS_URL (common/redis_client.py): the CA bundle (PEM) that
    # signed Redis's certificate (default: the system's CAs), and a client certificate and
    # key for Redis's `tls-auth-clients`. The certificate and its host name are verified
    # unless REDIS_TLS_VERIFY is false (encrypted, but anyone can pose as Redis).
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    redis_tls_verify: bool = True
    # Redis Sentinel (common/redis_client.py): the Sentinels, "host:port" comma-separated,
    # and the name they monitor the primary under. Set, every connection asks them where
    # the primary is (REDIS_URL's host and port are then not used; its password, database
    # and scheme are). REDIS_SENTINEL_PASSWORD: the Sentinels' own password, if any.
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None
    # How long a command that cannot reach Redis (connection refused, reset or timed out)
    # is retried before the request fails with 503 "cannot reach Redis". Unset: about a
    # third of a second (three quick retries), or 15 s with REDIS_SENTINELS, to ride out a
    # failover (Sentinel's down-after-milliseconds plus its election) instead of answering
    # 503 meanwhile.
    redis_retry_seconds: float | None = Field(default=None, ge=0, le=300)

    # API keys and admission control (see api/auth.py, api/admission.py).
    # Bearer keys, comma-separated, and/or a file with one key per line. None configured:
    # the API is open (anyone reaching it may use it), and `make run` listens on loopback.
    api_keys: str = ""
    api_keys_file: str | None = None
    # Keys that may also see and cancel every key's jobs, files and batches.
    admin_api_keys: str = ""
    # Interactive jobs one model may have waiting (queued, not started); past it a new
    # request gets a 429 with Retry-After. 0: four times the live workers' slots.
    max_queued_jobs: int = Field(default=0, ge=0)
    # Per key: interactive jobs queued or running at once, and chat requests a minute
    # (0: no limit). Refused with a 429 and x-ratelimit-* headers.
    max_concurrent_jobs_per_key: int = Field(default=0, ge=0)
    requests_per_minute_per_key: int = Field(default=0, ge=0)

    # API processes serving one port (uvicorn's supervisor, `python -m api.serve`): every
    # feature works whichever process a request lands on (state lives in Redis) and
    # /metrics sums all of them. `make run` uses min(cores // 2, 8) when this is unset.
    api_processes: int = Field(default=1, ge=1, le=64)

    # Metrics (issue 9, api/metrics.py): the API's `GET /metrics` and `GET /metrics/targets`
    # are public (like /health) unless this is true; then they need a key too.
    metrics_require_key: bool = False

    # The model a worker serves: a local checkpoint folder (or a hub id where a hub is
    # reachable), published to clients under `model_name`.
    model_path: str = "models/SmolLM2-135M-Instruct"
    model_name: str = "SmolLM2-135M-Instruct"
    # `vllm`, or `fake`: a stand-in that answers instantly (benchmarks of the orchestration only).
    engine: Literal["vllm", "fake"] = "vllm"
    # ENGINE=fake only: how long each engine step (8 tokens per choice) takes. 0: at once;
    # the chaos test slows it down so that jobs are in flight when faults hit.
    fake_step_seconds: float = Field(default=0.0, ge=0)
    # Upper bound on prompt + completion tokens; default: the model's own context.
    max_model_len: int | None = None
    # `auto`: the checkpoint's dtype, as vLLM's own `auto` (see worker.engine.resolve_dtype).
    dtype: str = "auto"
    # GPU only: the fraction of GPU memory vLLM may take.
    gpu_memory_utilization: float = 0.9
    # None: eager on a CPU (nothing to capture), CUDA graphs on a GPU.
    enforce_eager: bool | None = None
    # How many jobs one worker keeps in its engine at once (Celery thread slots). The
    # default is the engine's own batch limit (vLLM's max_num_seqs, 256, as `vllm serve`
    # has it): fewer slots would keep jobs waiting in the queue while the engine could
    # take them (64 slots under Poisson arrivals near the engine's rate: queue waits of
    # 1 to 1.9 s at p99, first token p99 +0.8 to +1.7 s against `vllm serve`).
    worker_slots: int = Field(default=256, ge=1)
    # The worker process's interpreter switch interval (`sys.setswitchinterval`), ms: how
    # long a thread that wants the interpreter lock waits for a busy one to let go. The
    # engine's event loop shares the lock with the Celery consumer and the slot threads;
    # Python's 5 ms held it back under a burst (issue 12; see worker/celery_app.py).
    worker_switch_interval_ms: float = Field(default=1.0, gt=0, le=100)

    # OpenAI chat surface (issue 10), as `vllm serve`'s flags of the same names: the
    # worker parses its model's output with vLLM's own parser classes and announces what
    # it can do in its model card, so the API refuses what it cannot.
    # A vLLM tool-call parser (`--tool-call-parser`, e.g. `hermes`); "": no tool calls
    # (tool_choice other than `none` is refused). A name vLLM does not know stops the worker.
    tool_call_parser: str = ""
    # `--enable-auto-tool-choice`: tool_choice `auto` parses tool calls out of free text.
    # None: on when a tool-call parser is set.
    enable_auto_tool_choice: bool | None = None
    # A vLLM reasoning parser (`--reasoning-parser`, e.g. `deepseek_r1`, `qwen3`); "":
    # none (no `reasoning` in answers). A name vLLM does not know stops the worker.
    reasoning_parser: str = ""
    # `--chat-template`: a jinja file replacing the model's chat template. The worker
    # publishes it with its tokenizer files (as chat_template.jinja), so the API renders
    # prompts with it.
    chat_template: str | None = None

    # Worker metrics (issue 9, worker/metrics.py): each worker serves Prometheus metrics
    # (its engine's `vllm:*` and its own `llmq_worker_*`) at http://host:port/metrics,
    # announced as `metrics_url` in its registration. Port 0: any free port. The address
    # announced is `worker_metrics_advertise_host` if set, else the bind address if it is
    # a specific one, else this machine's address on the route to Redis (what the API and
    # Prometheus, next to Redis, can reach; in docker compose the container's address).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "0.0.0.0"
    worker_metrics_advertise_host: str | None = None

    # Job records and replay data live this long in Redis.
    job_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    # Workers refresh their registration this often; a worker silent for
    # `worker_ttl_seconds` no longer counts as live.
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    worker_ttl_seconds: float = Field(default=15.0, gt=0)
    # A running job is held under a lease its worker renews every heartbeat; a job whose
    # lease lapsed (its worker died, hung or lost it) goes back to the queue.
    lease_seconds: float = Field(default=15.0, gt=0)
    # A lost worker's jobs are re-run this many attempts in all, then failed.
    max_attempts: int = Field(default=3, ge=1)
    # How often lapsed leases and overdue queued jobs are looked for (one process at a time).
    reaper_interval_seconds: float = Field(default=3.0, gt=0)
    # A job still queued this long is sent to its queue again (its message may be gone:
    # claims make duplicates harmless).
    queue_resend_seconds: float = Field(default=30.0, gt=0)
    # A job that has not started this long after it was queued fails (`queue_timeout`);
    # one whose model has had no live worker for `no_worker_timeout_seconds` fails sooner
    # (`model_unavailable`). Batch lines wait until their batch expires instead.
    queue_timeout_seconds: float = Field(default=600.0, gt=0)
    no_worker_timeout_seconds: float = Field(default=120.0, gt=0)
    # A message a dead worker had taken but not yet started goes back to the queue after
    # this long (running jobs are re-queued by the reaper long before). A job running
    # longer is redelivered too, and skipped: it claims its record before it runs.
    broker_visibility_timeout: int = Field(default=120, ge=10)

    # Per-stream buffer of undelivered events before a slow client is cut off.
    stream_buffer_events: int = Field(default=4096, ge=16)
    # Keep-alive comments (`: ping`) on the resume streams (GET .../stream), every this
    # many seconds: EventSource clients and proxies expect them.
    sse_ping_seconds: float = Field(default=15.0, gt=0)
    # The same on the streams of POST /v1/chat/completions and /v1/completions; 0 (the
    # default): none, as OpenAI and vLLM send none. A naive SSE parser (vLLM's benchmark
    # client, clients that split on blank lines and strip `data: `) takes a comment for
    # data and loses the event next to it. Set it when a proxy's idle timeout is shorter
    # than a queued job's wait for its first token.
    sse_create_ping_seconds: float = Field(default=0.0, ge=0)
    # A client that accepts nothing for this long is disconnected.
    sse_send_timeout_seconds: float = Field(default=30.0, gt=0)

    # Logs (issue 9, common/logs.py): one line per request and per job state change, from
    # the API and the workers, each with the job id. `text` for humans, `json` (one object
    # per line) for machines. Prompt and completion text are logged only with log_prompts.
    log_format: Literal["text", "json"] = "text"
    log_level: str = Field(default="INFO", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_prompts: bool = False

    max_n: int = Field(default=16, ge=1)
    # Completions: choices one request may ask for, n × its prompts (each prompt is a vLLM
    # request on one worker, though the job is admitted and counted once).
    max_prompts: int = Field(default=256, ge=1)

    # Request limits (hostile input): each is answered with a 4xx OpenAI error before the
    # request is parsed further, tokenized or queued (api/limits.py).
    # Bytes of a request body (413 beyond), counted as they arrive; `POST /v1/files`
    # has `upload_max_bytes` instead.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Bytes of all request header lines together (431 beyond).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    # Nesting of arrays and objects in a JSON body (400 beyond).
    max_json_depth: int = Field(default=64, ge=4)
    # Messages in one chat request, and characters of their text together (400 beyond):
    # tokenizing costs the API about 170 bytes of memory per character.
    max_messages: int = Field(default=2048, ge=1)
    max_prompt_chars: int = Field(default=1024 * 1024, ge=1)
    # n × max_tokens of one request (400 beyond; a max_tokens left out is cut to fit).
    max_total_completion_tokens: int = Field(default=262_144, ge=1)

    # Batch API: where files live (shared by API processes), and the input limits.
    files_dir: str = "var/files"
    batch_max_lines: int = Field(default=50_000, ge=1)
    batch_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    upload_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    # Batch lines in flight may take at most this share of the live workers' slots; the
    # rest stays free for interactive chat.
    batch_slot_share: float = Field(default=0.75, gt=0, le=1)

    # --- Deployment: configuration file, CORS, Flower (issue 8) -----------------------
    # Where settings come from, first match wins: environment variables, the YAML file
    # named by the CONFIG_PATH environment variable (keys: these settings' names, e.g.
    # `max_n: 8`), the `.env` file, the defaults. A CONFIG_PATH naming no file, a YAML
    # that is not a mapping, or an unknown key stops the process with a ConfigError.
    # Origins whose browser pages may call the API (CORS), e.g. `https://app.example.com`;
    # comma-separated in the environment, a list or that string in YAML; `*` for any.
    # None (the default): no CORS headers at all.
    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Flower's HTTP basic auth, `user:password` (several: comma-separated; so no commas in
    # passwords). `make run` passes it to Flower; docker compose requires it.
    flower_basic_auth: SecretStr | None = None

    @field_validator("cors_allowed_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list):
            return value
        origins = []
        for item in value:
            origin = str(item).strip().rstrip("/")
            if not origin:
                continue
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"not an origin (scheme://host[:port], no path): {item!r}")
            origins.append(origin)
        return origins

    @field_validator("flower_basic_auth", mode="after")
    @classmethod
    def _check_basic_auth(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        for pair in value.get_secret_value().split(","):
            user, sep, password = pair.partition(":")
            if not (sep and user.strip() and password):
                raise ValueError("expected user:password (comma-separated for several)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_path = os.environ.get("CONFIG_PATH", "").strip()
        yaml_source = [_yaml_source(settings_cls, Path(config_path))] if config_path else []
        return (init_settings, env_settings, *yaml_source, dotenv_settings, file_secret_settings)

    @property
    def auto_tool_choice(self) -> bool:
        """ENABLE_AUTO_TOOL_CHOICE resolved: unset, on when a tool-call parser is set."""
        if self.enable_auto_tool_choice is None:
            return bool(self.tool_call_parser)
        return self.enable_auto_tool_choice

    @property
    def served_tool_call_parser(self) -> str | None:
        """The tool-call parser a worker actually uses: as `vllm serve`, vLLM loads it only
        with auto tool choice on (without it, no tool_choice but `none` can be served)."""
        return self.tool_call_parser if self.tool_call_parser and self.auto_tool_choice else None

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_list(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            host, sep, port = item.rpartition(":")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"expected host:port[,host:port...], got {item!r}")
        return value

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; [] when Sentinel is not used."""
        pairs = []
        for item in filter(None, (part.strip() for part in self.redis_sentinels.split(","))):
            host, _, port = item.rpartition(":")
            pairs.append((host.strip("[]"), int(port)))
        return pairs

    @field_validator("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        if value is not None and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @property
    def model_dir(self) -> Path | None:
        path = Path(self.model_path)
        return path if path.exists() else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
