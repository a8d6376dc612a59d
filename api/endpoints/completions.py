"""CompletionAdapter: `POST /v1/completions` (legacy completions, as `vllm serve` answers
them) on the job pipeline. A prompt (a string, token ids, or a list of either) becomes
one job, `n` choices per prompt (choice `p * n + j`); echo and logprobs come from the
worker (OutputSpec). Reading, streaming, resuming and cancelling are the chat
endpoint's (`JobAdapter`), in `text_completion` objects."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from api.auth import Principal
from api.endpoints.chat import (
    JobAdapter,
    JobView,
    check_token_ids,
    resolve_max_tokens,
    sampling_from_request,
    tokenize_off_loop_if_long,
)
from api.relay import Subscription
from common.errors import InvalidRequestError
from common.jobs import JobOptions, JobRecord, JobRequest, OutputSpec
from common.schemas import CompletionRequest


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionAdapter(JobAdapter):
    kind = "completion"
    noun = "completion"
    path = "/v1/completions"

    def _limits(self, req: CompletionRequest, prompts: list[str | list[int]]) -> int:
        """Prompts, their text and choices × max_tokens, before anything is tokenized; the
        largest max_tokens each choice may have."""
        settings = self.settings
        if req.n > settings.max_n:
            raise InvalidRequestError(f"n must be at most {settings.max_n}", param="n")
        if req.n * len(prompts) > settings.max_prompts:
            raise InvalidRequestError(
                f"prompt: n × prompts may be at most {settings.max_prompts}, got {req.n} × {len(prompts)}",
                param="prompt",
                code="array_above_max_length",
            )
        chars = sum(len(p) if isinstance(p, str) else 0 for p in prompts)
        if chars > settings.max_prompt_chars:
            raise InvalidRequestError(
                f"prompt: the prompts hold {chars} characters; at most {settings.max_prompt_chars} are allowed",
                param="prompt",
                code="string_above_max_length",
            )
        choices = req.n * len(prompts)
        cap = settings.max_total_completion_tokens
        if req.max_tokens is not None and choices * req.max_tokens > cap:
            raise InvalidRequestError(
                f"max_tokens: choices (n × prompts) × max_tokens must be at most {cap}, got {choices} × "
                f"{req.max_tokens}",
                param="max_tokens",
            )
        return max(1, cap // choices)

    async def prepare(self, req: CompletionRequest, job_id: str | None = None, owner: str = "") -> JobRecord:
        prompts = req.prompt_list()
        choice_max_tokens = self._limits(req, prompts)
        card, tokenizer = await self.model(req.model)
        check_token_ids(req, tokenizer.vocab_size, [p for p in prompts if isinstance(p, list)])

        def tokenize() -> list[list[int]]:
            return [tokenizer.encode(p, req.add_special_tokens) if isinstance(p, str) else p for p in prompts]

        chars = sum(len(p) for p in prompts if isinstance(p, str))
        ids = await tokenize_off_loop_if_long(chars, tokenize)
        if any(not p for p in ids):
            raise InvalidRequestError("prompt: a prompt has no tokens", param="prompt")
        # Every prompt must fit the context with max_tokens (null: the room the longest leaves).
        max_tokens = min(resolve_max_tokens(req, len(p), card.max_model_len, param="prompt") for p in ids)
        max_tokens = min(max_tokens, choice_max_tokens)
        sampling = sampling_from_request(req, max_tokens)
        output = None
        if req.needs_output():
            echo = None
            if req.echo:
                echo = await asyncio.to_thread(
                    lambda: [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
                )
            output = OutputSpec(api="completion", body=req.vllm_body(max_tokens), echo_texts=echo)
        return JobRecord(
            id=job_id or new_completion_id(),
            model=req.model,
            owner=owner,
            request=JobRequest(prompt_token_ids=ids[0], more_prompts=ids[1:] or None, sampling=sampling, output=output),
            options=JobOptions(stream=req.stream, include_usage=req.include_usage, background=req.background),
        )

    async def submit(
        self, req: CompletionRequest, caller: Principal
    ) -> tuple[JobView, Subscription | None, dict[str, str]]:
        prompt: dict[str, Any] = {"prompt": req.prompt}
        return await self._submit(req, caller, prompt)
