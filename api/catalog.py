"""ModelCatalog: which models have a live worker, and their tokenizers.

Workers register a heartbeat and a model card (context length, tokenizer files) in
Redis. The API rebuilds each model's tokenizer from those files so it can render the
chat template and count prompt tokens itself, and refuse a prompt that is too long
before anything is queued. transformers is used without torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from api.refreshed import Refreshed
from api.templates import render_arguments
from common import keys
from common.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from common.heap import freeze_startup_heap
from common.jobs import ModelCard
from common.schemas import ChatCompletionRequest
from common.workers import live_workers

log = logging.getLogger(__name__)


# transformers resolves its names lazily on first use; two threads doing that at once
# (the warm-up and a request's tokenizer load) saw "cannot import name 'AutoTokenizer'".
_IMPORT_LOCK = threading.Lock()


def auto_tokenizer() -> Any:
    with _IMPORT_LOCK:
        from transformers import AutoTokenizer

        return AutoTokenizer


# Texts the fast encoder must tokenize as transformers does before it is used.
_PROBES = [
    "Write a haiku about the sea.",
    "",
    "  leading and trailing spaces, tabs\tand\n\nnewlines  ",
    "Ünïcödé, 日本語のテキスト, emoji 🙂 and a zero-width\u200bjoiner",
    "code: def f(x):\n    return x ** 2  # comment\n",
]


class ChatTokenizer:
    """A model's tokenizer and chat template, as the worker's engine uses them."""

    def __init__(self, folder: Path):
        self._tok = auto_tokenizer().from_pretrained(str(folder))
        template = self._tok.chat_template
        self.template: str = template if isinstance(template, str) else ""
        # Token ids a request may name (logit_bias, stop_token_ids, token-id prompts).
        self.vocab_size = len(self._tok)
        self._fast = self._fast_encoder()

    def _fast_encoder(self) -> Callable[..., list[Any]] | None:
        """The Rust tokenizer's own encoder (`tokenizers.Tokenizer.encode_batch_fast`), if it
        gives the token ids transformers' call gives on probe texts (the chat template's
        special tokens included); None to keep transformers' call. transformers' Python
        around that same encoder (its BatchEncoding, offsets, checks) took 34 of a 64 us
        prompt (issue 12): every chat request and every batch line pays it."""
        backend: Any = getattr(self._tok, "backend_tokenizer", None)
        fast = getattr(backend, "encode_batch_fast", None)
        if fast is None or getattr(self._tok, "split_special_tokens", False):
            return None
        # transformers' call sets the encoder's truncation and padding for each call (to
        # none, as the API calls it); the encoder keeps that state: it must be none here.
        self._call_encode("", False)
        if backend.truncation is not None or backend.padding is not None:
            return None
        probes = [*_PROBES, *(str(t) for t in self._tok.all_special_tokens)]
        if self.template:
            with contextlib.suppress(Exception):  # a template that wants more than one message
                conversation = [{"role": "user", "content": _PROBES[0]}]
                probes.append(
                    str(self._tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
                )
        for text in probes:
            for special in (False, True):
                if fast([text], add_special_tokens=special)[0].ids != self._call_encode(text, special):
                    log.warning("the model's tokenizer encodes through transformers' call (its encoder differs)")
                    return None
        return fast  # type: ignore[no-any-return]

    def encode_chat(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt tokens of a chat request, rendered as `vllm serve` renders them
        (api.templates)."""
        conversation, kwargs = render_arguments(req, self.template)
        try:
            text = self._tok.apply_chat_template(conversation, tokenize=False, **kwargs)
        except Exception as exc:  # jinja2 TemplateError and friends: the messages don't fit
            raise InvalidRequestError(
                f"messages do not fit the model's chat template: {exc}", param="messages"
            ) from exc
        return self.encode(text, add_special_tokens=req.add_special_tokens)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._fast is not None:
            return self._fast([text], add_special_tokens=add_special_tokens)[0].ids  # type: ignore[no-any-return]
        return self._call_encode(text, add_special_tokens)

    def _call_encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


class ModelCatalog:
    def __init__(self, redis: aioredis.Redis, worker_ttl_seconds: float, cache_seconds: float = 3.0):
        self.redis = redis
        self.worker_ttl = worker_ttl_seconds
        self.cache_seconds = cache_seconds
        # The live models (and their workers' slots, for admission): `keep_warm` reads
        # them every 2 s, so a request finds them under `cache_seconds` old and takes them
        # as they are; older (no `keep_warm`, or it is late), up to a heartbeat more, too,
        # with a read in the background. No request waits for them (at a request every
        # second or two, each waited on four round trips for them; issue 12). A model that
        # no live worker has any more may so be taken for a few seconds more: its jobs
        # wait in the queue, as those of a worker that died without a word do for
        # `worker_ttl`.
        self._live = Refreshed(self._read_live, cache_seconds, max(cache_seconds, 5.0), name="live models")
        self._tokenizers: dict[str, ChatTokenizer] = {}
        self._loading: dict[str, asyncio.Task[ChatTokenizer]] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="llmq-tokenizers-")

    async def live_models(self, fresh: bool = False) -> dict[str, ModelCard]:
        return (await self._live.get(fresh))[0]

    async def live_slots(self, model: str) -> int:
        """The batch slots of `model`'s live workers, all together."""
        return (await self._live.get())[1].get(model, 0)

    async def _read_live(self) -> tuple[dict[str, ModelCard], dict[str, int]]:
        now = time.time()
        workers = await live_workers(self.redis, self.worker_ttl)
        slots: dict[str, int] = {}
        for w in workers:
            slots[w.model] = slots.get(w.model, 0) + w.slots
        models: dict[str, ModelCard] = {}
        if slots:
            ordered = sorted(slots)
            cards = await self.redis.mget([keys.model_card(n) for n in ordered])
            models = {n: ModelCard.model_validate_json(c) for n, c in zip(ordered, cards, strict=True) if c}
        # Forget workers long gone so the set stays small.
        await self.redis.zremrangebyscore(keys.WORKERS, "-inf", now - 10 * self.worker_ttl)
        return models, slots

    async def get(self, name: str) -> tuple[ModelCard, ChatTokenizer]:
        models = await self.live_models()
        card = models.get(name)
        if card is None:
            models = await self.live_models(fresh=True)
            card = models.get(name)
        if card is None:
            served = ", ".join(sorted(models)) or "none"
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or has no live worker (served: {served}).",
                param="model",
            )
        return card, await self._tokenizer(card)

    async def _tokenizer(self, card: ModelCard) -> ChatTokenizer:
        digest = card.tokenizer_digest
        if digest in self._tokenizers:
            return self._tokenizers[digest]
        task = self._loading.get(digest)
        if task is None:
            task = asyncio.create_task(self._load(digest))
            self._loading[digest] = task
        try:
            tok = await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(digest, None)
        self._tokenizers[digest] = tok
        return tok

    async def _load(self, digest: str) -> ChatTokenizer:
        files = await self.redis.hgetall(keys.tokenizer_bundle(digest))
        if not files:
            raise ServiceUnavailableError("the model's tokenizer is not registered yet; retry shortly")
        folder = Path(self._dir.name) / digest
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            safe = Path(keys.text(name)).name  # never outside the folder
            (folder / safe).write_bytes(content if isinstance(content, bytes) else content.encode())
        return await asyncio.to_thread(ChatTokenizer, folder)

    def ready_models(self, names: list[str]) -> list[str]:
        cards = self._live.value[0] if self._live.value else {}
        return [n for n in names if n in cards and cards[n].tokenizer_digest in self._tokenizers]

    async def keep_warm(self, interval: float = 2.0) -> None:
        """Load each live model's tokenizer as soon as its worker registers, so no client
        request pays for it (importing transformers alone takes seconds)."""
        await asyncio.to_thread(auto_tokenizer)
        # transformers' modules (some 300,000 objects) live as long as the process.
        freeze_startup_heap("api")
        while True:
            try:
                for card in (await self.live_models(fresh=True)).values():
                    await self._tokenizer(card)
            except Exception as exc:  # Redis down, or a bundle not there yet: next round
                log.debug("tokenizer warm-up: %s", exc)
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        await self._live.aclose()
        self.close()

    def close(self) -> None:
        self._dir.cleanup()
