"""A trivially fast stand-in engine (ENGINE=fake): every step yields a few tokens per choice
at once (or after FAKE_STEP_SECONDS). It measures what the queue, the workers and the API
cost on their own (the orchestration ceiling); it never stands in for testing the real
engine.

Its text is positional: the token at position p of the sequence (prompt included) reads
" t<p>", so a continuation (prompt + the tokens already sent) goes on counting where the
first attempt stopped, and a lost, repeated or reordered piece of text shows:
`expected_text(prompt_tokens, completion_tokens)` is the whole answer.

Rich jobs (`JobRequest.output`, issue 10) get answers shaped like the real engine's, so
the API's rendering, resume and retry paths run on it (the shapes, not vLLM's parsing):
- a chat body with a named tool_choice: the choice streams one tool call, first
  {"index": 0, "id": "chatcmpl-tool-<16 hex>", "type": "function", "function": {"name":
  <the name>, "arguments": ""}}, then the arguments in fragments, one per step, which join
  to `{"text": "<the fake text>"}`; it finishes "stop" (a named call, as vLLM's) and its
  last delta carries the message {"content": "", "reasoning": None, "tool_calls": [the
  call], "finish_reason": "stop"}. The id is derived from the job id and the choice, so
  a retried attempt streams the same one.
- any other chat body: the fake text as content, and on the last delta the message
  {"content": <the text>, "reasoning": None, "tool_calls": [], "finish_reason": ...}.
- `logprobs` in the body: each fake token gets logprob -(position % 7) / 8 (chat:
  {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}, with `top_logprobs`
  entries of the same token; completion: {"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}, offsets running on across deltas).
- completions with `echo`: the first delta of each choice starts with its prompt's text
  (echo_texts[p]); echoed prompt tokens get no logprobs entries here (the first
  token's text_offset is the echo's length).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from common.jobs import ChoiceDelta, JobRequest, OutputSpec
from common.settings import Settings
from worker.chat_template import read_chat_template, with_chat_template

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
        self.dtype = "fake"
        self.tokens_per_step = tokens_per_step
        self.step_seconds = settings.fake_step_seconds
        self._aborted: set[str] = set()
        self.dead = False

    async def start(self) -> None:
        return None

    def tokenizer_files(self) -> dict[str, bytes]:
        folder = Path(self.settings.model_path)
        files = {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}
        return with_chat_template(files, read_chat_template(self.settings))

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
                stopped = [ChoiceDelta(index=i, finish_reason="cancelled") for i in range(choices)]
                if request.output is not None and request.output.api == "chat":
                    for d in stopped:
                        d.message = {
                            "content": token_text(prompt_len, sent),
                            "reasoning": None,
                            "tool_calls": [],
                            "finish_reason": "cancelled",
                        }
                yield stopped
                return
            step = min(self.tokens_per_step, sampling.max_tokens - sent)
            position = prompt_len + sent
            text = token_text(position, step)
            sent += step
            done = "length" if sent >= sampling.max_tokens else None
            if request.output is None:
                yield [
                    ChoiceDelta(index=i, text=text, token_ids=[42] * step, finish_reason=done) for i in range(choices)
                ]
                continue
            yield [
                self._rich_delta(request_id, request.output, sampling.n, i, prompt_len, position, step, done)
                for i in range(choices)
            ]

    def _rich_delta(
        self,
        request_id: str,
        spec: OutputSpec,
        n: int,
        index: int,
        start: int,
        position: int,
        count: int,
        done: str | None,
    ) -> ChoiceDelta:
        """One step of choice `index` of a rich job whose fake text starts at position
        `start` (see the module docstring)."""
        body = spec.body
        first = position == start
        text = token_text(position, count)
        whole = token_text(start, position + count - start)
        delta = ChoiceDelta(index=index, token_ids=[42] * count)
        echo = spec.echo_texts[index // n] if spec.api == "completion" and body.get("echo") and spec.echo_texts else ""
        wants_logprobs = body.get("logprobs") if spec.api == "chat" else body.get("logprobs") is not None
        if wants_logprobs:
            offset = len(echo) + len(token_text(start, position - start))
            delta.logprobs = _fake_logprobs(spec.api, body, position, count, offset)
        tool_choice = body.get("tool_choice")
        named = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
        if spec.api == "chat" and named:
            call_id = "chatcmpl-tool-" + hashlib.sha256(f"{request_id}/{index}".encode()).hexdigest()[:16]
            fragment = ('{"text": "' if first else "") + text + ('"}' if done else "")
            calls: list[dict[str, Any]] = []
            if first:
                calls.append(
                    {"index": 0, "id": call_id, "type": "function", "function": {"name": named, "arguments": ""}}
                )
            calls.append({"index": 0, "function": {"arguments": fragment}})
            delta.tool_calls = calls
            if done:
                delta.finish_reason = "stop"
                arguments = json.dumps({"text": whole})
                delta.message = {
                    "content": "",
                    "reasoning": None,
                    "tool_calls": [
                        {"id": call_id, "type": "function", "function": {"name": named, "arguments": arguments}}
                    ],
                    "finish_reason": "stop",
                }
            return delta
        if first:
            text = echo + text
        delta.text = text
        delta.finish_reason = done
        if done and spec.api == "chat":
            delta.message = {"content": whole, "reasoning": None, "tool_calls": [], "finish_reason": done}
        return delta

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def alive(self) -> bool:
        return not self.dead

    def die(self) -> None:
        """Tests: the engine stops for good (as vLLM's engine core does when it crashes)."""
        self.dead = True

    async def shutdown(self) -> None:
        return None


def _fake_logprobs(api: str, body: dict[str, Any], position: int, count: int, offset: int) -> dict[str, Any]:
    """Fake logprobs of `count` tokens from `position` on, in the API's wire shape; `offset`:
    the text offset of the first (completions)."""
    tokens = [f" t{p}" for p in range(position, position + count)]
    values = [-((position + k) % 7) / 8 for k in range(count)]
    if api == "chat":
        top = int(body.get("top_logprobs") or 0)
        return {
            "content": [
                {
                    "token": tok,
                    "logprob": lp,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [{"token": tok, "logprob": lp, "bytes": list(tok.encode())}] * min(top, 1),
                }
                for tok, lp in zip(tokens, values, strict=True)
            ]
        }
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, values, strict=True)],
        "text_offset": offsets,
    }
