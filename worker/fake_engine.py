"""A trivially fast stand-in engine (ENGINE=fake): every step yields a few tokens per choice
at once (or after FAKE_STEP_SECONDS). It measures what the queue, the workers and the API
cost on their own (the orchestration ceiling); it never stands in for testing the real
engine.

Its text is positional: the token at position p of the sequence (prompt included) reads
" t<p>", so a continuation (prompt + the tokens already sent) goes on counting where the
first attempt stopped, and a lost, repeated or reordered piece of text shows:
`expected_text(prompt_tokens, completion_tokens)` is the whole answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from common.jobs import ChoiceDelta, JobRequest
from common.settings import Settings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def token_text(position: int, count: int) -> str:
    """The fake text of `count` tokens from sequence position `position` on."""
    return "".join(f" t{p}" for p in range(position, position + count))


def expected_text(prompt_tokens: int, completion_tokens: int) -> str:
    """The whole fake answer of a job whose prompt had `prompt_tokens` tokens."""
    return token_text(prompt_tokens, completion_tokens)


class FakeEngine:
    def __init__(self, settings: Settings, tokens_per_step: int = 8):
        self.settings = settings
        self.max_model_len = settings.max_model_len or 8192
        self.tokens_per_step = tokens_per_step
        self.step_seconds = settings.fake_step_seconds
        self._aborted: set[str] = set()
        self.dead = False

    async def start(self) -> None:
        return None

    def tokenizer_files(self) -> dict[str, bytes]:
        folder = Path(self.settings.model_path)
        return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}

    async def generate(self, request_id: str, request: JobRequest) -> AsyncIterator[list[ChoiceDelta]]:
        sampling = request.sampling
        choices = request.choices
        # Every prompt's samples read the same (from the first prompt's length on).
        prompt_len = len(request.prompt_token_ids)
        sent = 0
        while sent < sampling.max_tokens:
            await asyncio.sleep(self.step_seconds)
            if self.dead:
                raise RuntimeError("the fake engine is dead")
            if request_id in self._aborted:
                self._aborted.discard(request_id)
                yield [ChoiceDelta(index=i, finish_reason="cancelled") for i in range(choices)]
                return
            step = min(self.tokens_per_step, sampling.max_tokens - sent)
            text = token_text(prompt_len + sent, step)
            sent += step
            done = "length" if sent >= sampling.max_tokens else None
            yield [ChoiceDelta(index=i, text=text, token_ids=[42] * step, finish_reason=done) for i in range(choices)]

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def alive(self) -> bool:
        return not self.dead

    def die(self) -> None:
        """Tests: the engine stops for good (as vLLM's engine core does when it crashes)."""
        self.dead = True

    async def shutdown(self) -> None:
        return None
