"""A trivially fast stand-in engine (ENGINE=fake): every step yields one token per choice
at once. It measures what the queue, the workers and the API cost on their own (the
orchestration ceiling); it never stands in for testing the real engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from common.jobs import ChoiceDelta, SamplingSpec
from common.settings import Settings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class FakeEngine:
    def __init__(self, settings: Settings, tokens_per_step: int = 8):
        self.settings = settings
        self.max_model_len = settings.max_model_len or 8192
        self.tokens_per_step = tokens_per_step
        self._aborted: set[str] = set()

    async def start(self) -> None:
        return None

    def tokenizer_files(self) -> dict[str, bytes]:
        folder = Path(self.settings.model_path)
        return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec
    ) -> AsyncIterator[list[ChoiceDelta]]:
        sent = 0
        while sent < sampling.max_tokens:
            await asyncio.sleep(0)
            if request_id in self._aborted:
                self._aborted.discard(request_id)
                yield [ChoiceDelta(index=i, finish_reason="cancelled") for i in range(sampling.n)]
                return
            step = min(self.tokens_per_step, sampling.max_tokens - sent)
            sent += step
            done = "length" if sent >= sampling.max_tokens else None
            yield [
                ChoiceDelta(index=i, text=" tok" * step, token_ids=[42] * step, finish_reason=done)
                for i in range(sampling.n)
            ]

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def shutdown(self) -> None:
        return None
