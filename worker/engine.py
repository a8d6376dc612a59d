"""The engine interface the worker runtime drives. `worker.vllm_engine` implements it with
vLLM (the only module that imports vllm); anything else that fits can stand in for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from common.jobs import ChoiceDelta, JobRequest
from common.settings import Settings


class EngineRequestError(ValueError):
    """The engine refused a request as invalid (a client error, not an engine fault)."""


class Engine(Protocol):
    #: prompt + completion token limit, known once `start` returned.
    max_model_len: int
    #: the weights' data type the engine runs ("bfloat16", "float32", ...), known once
    #: `start` returned; announced on the model card.
    dtype: str

    async def start(self) -> None:
        """Build the engine; called once, on the event loop that will drive it."""

    def tokenizer_files(self) -> dict[str, bytes]:
        """The files (name -> content) from which the API can rebuild the tokenizer
        and chat template, to count and validate prompts before queueing."""
        ...

    def generate(self, request_id: str, request: JobRequest) -> AsyncIterator[list[ChoiceDelta]]:
        """Yield, per engine step, what each choice gained: new text, its tokens, and its
        finish reason (`stop`, `length`, `tool_calls`, `cancelled`) once it ends. All of
        the request's prompts (`request.prompts`), choice `p * n + j` for sample j of
        prompt p. A rich request (`request.output`) answers in OpenAI's shapes as `vllm
        serve` would: content, reasoning, tool-call deltas and logprobs, and on each
        choice's last delta its whole `message` (chat)."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a running request and free its batch slot."""

    def alive(self) -> bool:
        """False once the engine has died (the worker then gives its jobs back and exits)."""
        ...

    async def shutdown(self) -> None: ...


def has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_dtype(settings: Settings) -> str:
    """The DTYPE the engine is built with. `auto` is vLLM's own `auto`: the checkpoint's
    dtype (bfloat16 for the default model) on a GPU and on a CPU alike, as `vllm serve`
    does. Until issue 12 a CPU ran float32, because bf16 had been seen to derail the
    default model's greedy answers; that could not be reproduced (the first worker's own
    code, run again on this checkpoint and vLLM build, answers in bf16 as in float32; so
    do vLLM's AVX512-without-BF16 and AVX2 kernels), and the engine is about 1.7x faster
    in bf16 (tests/integration/test_chat.py::test_default_dtype_answers_right). A CPU
    without bf16 instructions may be faster with DTYPE=float32. Here, not in the vLLM
    adapter, so what a worker runs with is known without importing vllm (the parity tests
    start `vllm serve` with the same)."""
    return settings.dtype


def resolve_eager(settings: Settings) -> bool:
    """ENFORCE_EAGER unset: eager on a CPU, CUDA graphs on a GPU."""
    return settings.enforce_eager if settings.enforce_eager is not None else not has_cuda()


def max_num_seqs(settings: Settings) -> int:
    """Sequences the engine batches: one per slot at least; `n` > 1 needs more."""
    return max(256, settings.worker_slots)


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "fake":
        from worker.fake_engine import FakeEngine

        return FakeEngine(settings)
    from worker.vllm_engine import VllmEngine

    return VllmEngine(settings)
