"""The vLLM engine adapter: with worker.openai_output, the only modules that import vllm.

One `AsyncLLM` per worker process, driven from the runtime's event loop; every job the
worker holds is a request inside it, so vLLM batches them continuously.

Plain text jobs take a lean path (SamplingSpec -> SamplingParams, text deltas). Rich jobs
(`JobRequest.output`: tools, structured output, reasoning, logprobs, echo) go through
`worker.openai_output`, which runs them as `vllm serve` would, with vLLM's own protocol
classes and parsers. A job with several prompts (completions) is one vLLM request per
prompt (`<job id>-<p>`), merged into choices p*n + j.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.utils.async_utils import merge_async_iterators
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import PrometheusStatLogger

from common.jobs import ChoiceDelta, JobRequest, SamplingSpec
from common.settings import Settings
from worker.chat_template import read_chat_template, with_chat_template
from worker.engine import EngineRequestError, max_num_seqs, resolve_dtype, resolve_eager
from worker.openai_output import (
    REQUEST_ERRORS,
    OpenAIFrontend,
    ParserConfigError,
    check_parser_names,
    finish_reason,
)

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
# OpenAI's defaults for the knobs a plain job may leave unset (vLLM's protocol classes'
# `_DEFAULT_SAMPLING_PARAMS`, plus the penalties SamplingParams defaults to).
PLAIN_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


def plain_deltas(output: RequestOutput, base: int = 0) -> list[ChoiceDelta]:
    """A plain job's step: each output's text, tokens and end (choice `base + index`)."""
    return [
        ChoiceDelta(
            index=base + o.index,
            text=o.text,
            token_ids=list(o.token_ids),
            finish_reason=finish_reason(o.finish_reason),
            stop_reason=o.stop_reason,
        )
        for o in output.outputs
    ]


class VllmEngine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.llm: AsyncLLM | None = None
        self.max_model_len = 0
        self.dtype = ""
        # Rich jobs (issue 10): vLLM's OpenAI machinery, built once the engine is up.
        self.frontend: OpenAIFrontend | None = None
        # Jobs with several prompts: the vLLM request ids of each (abort takes them all).
        self._subrequests: dict[str, list[str]] = {}

    async def start(self) -> None:
        s = self.settings
        # Refused before the engine takes its ~40 s: a parser vLLM does not know, a chat
        # template that is not there.
        check_parser_names(s.tool_call_parser, s.reasoning_parser, s.auto_tool_choice)
        read_chat_template(s)
        args = AsyncEngineArgs(
            model=s.model_path,
            served_model_name=[s.model_name],
            dtype=resolve_dtype(s),  # type: ignore[arg-type]
            max_model_len=s.max_model_len,  # type: ignore[arg-type]  # None: the model's own
            enforce_eager=resolve_eager(s),
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_num_seqs=max_num_seqs(s),
            # Stats on, recorded by vLLM's Prometheus logger only: its `vllm:*` metrics go
            # into this process's default registry, which the worker serves (worker/metrics.py).
            # Not the default LoggingStatLogger, whose periodic lines nobody asked for.
            disable_log_stats=True,
            # As `vllm serve --reasoning-parser`: structured outputs constrain the answer
            # after the reasoning, not the reasoning itself.
            reasoning_parser=s.reasoning_parser,
        )
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[PrometheusStatLogger])
        self.max_model_len = self.llm.model_config.max_model_len
        self.dtype = str(self.llm.model_config.dtype).removeprefix("torch.")
        try:
            self.frontend = OpenAIFrontend.build(
                self.llm.get_tokenizer(),
                tool_call_parser=s.tool_call_parser,
                reasoning_parser=s.reasoning_parser,
                enable_auto_tool_choice=s.enable_auto_tool_choice,
                model_config=self.llm.model_config,
                model_name=s.model_path,
            )
        except ParserConfigError:
            self.llm.shutdown()
            self.llm = None
            raise
        log.info(
            "vLLM engine ready: %s (dtype=%s, max_model_len=%d, tool_call_parser=%s, reasoning_parser=%s)",
            s.model_path,
            self.dtype,
            self.max_model_len,
            s.tool_call_parser or None,
            s.reasoning_parser or None,
        )

    def tokenizer_files(self) -> dict[str, bytes]:
        folder = Path(self.settings.model_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(self.settings.model_path, allow_patterns=list(TOKENIZER_FILES)))
        files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
        if not files:
            raise RuntimeError(f"no tokenizer files found in {folder}")
        return with_chat_template(files, read_chat_template(self.settings))

    async def generate(self, request_id: str, request: JobRequest) -> AsyncIterator[list[ChoiceDelta]]:
        assert self.llm is not None, "engine not started"
        if request.output is not None:
            async for deltas in self._generate_rich(request_id, request):
                yield deltas
            return
        sampling = request.sampling
        try:
            params = SamplingParams(
                n=sampling.n,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
                stop=sampling.stop,
                **self._sampling_knobs(sampling),
                ignore_eos=sampling.ignore_eos,
                min_tokens=sampling.min_tokens,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as exc:
            raise EngineRequestError(str(exc)) from exc
        if request.more_prompts:
            async for deltas in self._generate_plain_many(request_id, request, params):
                yield deltas
            return
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        try:
            async for output in self.llm.generate(prompt, params, request_id=request_id):
                yield plain_deltas(output)
        except ValueError as exc:
            # vLLM validates the prompt against the context length, etc.
            raise EngineRequestError(str(exc)) from exc

    def _sampling_knobs(self, sampling: SamplingSpec) -> dict[str, Any]:
        """The client's value, else the model's generation-config default, else OpenAI's:
        the order `vllm serve` applies (its `to_sampling_params`)."""
        defaults = self.frontend.default_sampling_params if self.frontend is not None else {}
        knobs: dict[str, Any] = {}
        for name, fallback in PLAIN_DEFAULTS.items():
            value = getattr(sampling, name)
            knobs[name] = value if value is not None else defaults.get(name, fallback)
        return knobs

    def _sub_ids(self, request_id: str, request: JobRequest) -> list[str]:
        if len(request.prompts) == 1:
            return [request_id]
        ids = [f"{request_id}-{p}" for p in range(len(request.prompts))]
        self._subrequests[request_id] = ids
        return ids

    async def _generate_plain_many(
        self, request_id: str, request: JobRequest, params: SamplingParams
    ) -> AsyncIterator[list[ChoiceDelta]]:
        assert self.llm is not None
        n = request.sampling.n
        ids = self._sub_ids(request_id, request)
        streams = [
            self.llm.generate(TokensPrompt(prompt_token_ids=prompt), params.clone(), request_id=sub)
            for prompt, sub in zip(request.prompts, ids, strict=True)
        ]
        try:
            async for p, output in merge_async_iterators(*streams):
                yield plain_deltas(output, base=p * n)
        except ValueError as exc:
            raise EngineRequestError(str(exc)) from exc
        finally:
            self._subrequests.pop(request_id, None)

    async def _generate_rich(self, request_id: str, request: JobRequest) -> AsyncIterator[list[ChoiceDelta]]:
        """A rich job as `vllm serve` runs it (worker.openai_output)."""
        assert self.llm is not None and self.frontend is not None
        try:
            rich = self.frontend.prepare(request)
        except REQUEST_ERRORS as exc:
            raise EngineRequestError(str(exc)) from exc
        ids = self._sub_ids(request_id, request)
        processors = [self.frontend.processor(rich, request, p) for p in range(len(ids))]
        streams = [
            self.llm.generate(
                TokensPrompt(prompt_token_ids=prompt), rich.params[p], request_id=sub, **rich.generate_kwargs[p]
            )
            for p, (prompt, sub) in enumerate(zip(request.prompts, ids, strict=True))
        ]
        started = False
        try:
            async for p, output in merge_async_iterators(*streams):
                started = True
                deltas = processors[p].process(output)
                if deltas:
                    yield deltas
        except REQUEST_ERRORS as exc:
            if started:
                raise  # a fault of ours (a parser, a formatter) mid-answer: not the client's
            # vLLM validates the prompt (context length) and the structured output's grammar
            # when the request is added, before its first output.
            raise EngineRequestError(str(exc)) from exc
        finally:
            self._subrequests.pop(request_id, None)

    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(self._subrequests.get(request_id) or request_id)

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
