"""The vLLM engine adapter: the only module in the project that imports vllm.

One `AsyncLLM` per worker process, driven from the runtime's event loop; every job the
worker holds is a request inside it, so vLLM batches them continuously.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import PrometheusStatLogger

from common.jobs import ChoiceDelta, JobRequest
from common.settings import Settings
from worker.engine import EngineRequestError

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def resolve_dtype(dtype: str) -> str:
    """`auto` means the checkpoint's dtype on a GPU, float32 on a CPU: vLLM's CPU build
    in bf16 derails the default model's greedy answers (measured: "L'Étoile, la
    Marseillaise" instead of "The capital of France is Paris.")."""
    if dtype != "auto":
        return dtype
    return "auto" if _has_cuda() else "float32"


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class VllmEngine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.llm: AsyncLLM | None = None
        self.max_model_len = 0

    async def start(self) -> None:
        s = self.settings
        args = AsyncEngineArgs(
            model=s.model_path,
            served_model_name=[s.model_name],
            dtype=resolve_dtype(s.dtype),  # type: ignore[arg-type]
            max_model_len=s.max_model_len,  # type: ignore[arg-type]  # None: the model's own
            enforce_eager=s.enforce_eager if s.enforce_eager is not None else not _has_cuda(),
            gpu_memory_utilization=s.gpu_memory_utilization,
            # One sequence per slot at least; `n` > 1 needs more.
            max_num_seqs=max(256, s.worker_slots),
            # Stats on, recorded by vLLM's Prometheus logger only: its `vllm:*` metrics go
            # into this process's default registry, which the worker serves (worker/metrics.py).
            # Not the default LoggingStatLogger, whose periodic lines nobody asked for.
            disable_log_stats=True,
        )
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[PrometheusStatLogger])
        self.max_model_len = self.llm.model_config.max_model_len
        log.info("vLLM engine ready: %s (max_model_len=%d)", s.model_path, self.max_model_len)

    def tokenizer_files(self) -> dict[str, bytes]:
        folder = Path(self.settings.model_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(self.settings.model_path, allow_patterns=list(TOKENIZER_FILES)))
        files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
        if not files:
            raise RuntimeError(f"no tokenizer files found in {folder}")
        return files

    async def generate(self, request_id: str, request: JobRequest) -> AsyncIterator[list[ChoiceDelta]]:
        assert self.llm is not None, "engine not started"
        sampling, prompt_token_ids = request.sampling, request.prompt_token_ids
        try:
            params = SamplingParams(
                n=sampling.n,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                seed=sampling.seed,
                stop=sampling.stop,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                repetition_penalty=sampling.repetition_penalty,
                ignore_eos=sampling.ignore_eos,
                min_tokens=sampling.min_tokens,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as exc:
            raise EngineRequestError(str(exc)) from exc
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        try:
            async for output in self.llm.generate(prompt, params, request_id=request_id):
                yield [
                    ChoiceDelta(
                        index=o.index,
                        text=o.text,
                        token_ids=list(o.token_ids),
                        finish_reason=FINISH_REASONS.get(o.finish_reason, o.finish_reason) if o.finish_reason else None,
                    )
                    for o in output.outputs
                ]
        except ValueError as exc:
            # vLLM validates the prompt against the context length, etc.
            raise EngineRequestError(str(exc)) from exc

    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
