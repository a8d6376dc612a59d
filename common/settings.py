"""Service settings, read from the environment (and a `.env` file) by both API and workers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    redis_url: str = "redis://localhost:6379/0"
    # Connections one process keeps to Redis; a command finding all busy waits this long.
    redis_max_connections: int = Field(default=256, ge=4)
    redis_pool_timeout_seconds: float = Field(default=20.0, gt=0)

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
    # `auto`: the checkpoint's dtype on a GPU, float32 on a CPU (see worker.vllm_engine).
    dtype: str = "auto"
    # GPU only: the fraction of GPU memory vLLM may take.
    gpu_memory_utilization: float = 0.9
    # None: eager on a CPU (nothing to capture), CUDA graphs on a GPU.
    enforce_eager: bool | None = None
    # How many jobs one worker keeps in its engine at once (Celery thread slots).
    worker_slots: int = Field(default=64, ge=1)

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
    sse_ping_seconds: float = Field(default=15.0, gt=0)
    # A client that accepts nothing for this long is disconnected.
    sse_send_timeout_seconds: float = Field(default=30.0, gt=0)
    max_n: int = Field(default=16, ge=1)

    # Batch API: where files live (shared by API processes), and the input limits.
    files_dir: str = "var/files"
    batch_max_lines: int = Field(default=50_000, ge=1)
    batch_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    upload_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    # Batch lines in flight may take at most this share of the live workers' slots; the
    # rest stays free for interactive chat.
    batch_slot_share: float = Field(default=0.75, gt=0, le=1)

    @property
    def model_dir(self) -> Path | None:
        path = Path(self.model_path)
        return path if path.exists() else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
