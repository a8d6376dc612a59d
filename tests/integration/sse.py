"""A raw SSE reader for tests: what the wire carries, including ids and keep-alive comments."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class SSEStream:
    events: list[tuple[str | None, str]] = field(default_factory=list)  # (id, data)
    comments: int = 0
    done: bool = False

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(d) for _, d in self.events if d != "[DONE]"]

    @property
    def text(self) -> str:
        return "".join(
            c["delta"].get("content") or ""
            for chunk in self.chunks
            for c in chunk.get("choices", [])
            if c["index"] == 0
        )

    def _cursor(self, event_id: str | None, data: str) -> str | None:
        """An event's resume cursor: its SSE `id` (resumed streams), else the `seq` in its
        chunk (a create request's stream has `data:` lines only)."""
        if event_id is not None:
            return event_id
        if data.startswith("{") and '"seq":' in data:
            seq = json.loads(data).get("seq")
            return str(seq) if seq is not None else None
        return None

    @property
    def last_id(self) -> str | None:
        ids = [c for i, d in self.events if (c := self._cursor(i, d)) is not None]
        return ids[-1] if ids else None

    @property
    def ids(self) -> list[int]:
        """Distinct cursors in order (a job's last event may render as two chunks)."""
        out: list[int] = []
        for i, d in self.events:
            c = self._cursor(i, d)
            if c is not None and (not out or int(c) != out[-1]):
                out.append(int(c))
        return out

    @property
    def id_lines(self) -> list[str]:
        return [i for i, _ in self.events if i is not None]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [c["error"] for c in self.chunks if "error" in c]

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for chunk in self.chunks for c in chunk.get("choices", []) if c.get("finish_reason")]


async def read_sse(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    json_body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    stop_after_content: int | None = None,
) -> SSEStream:
    """Read a stream to `[DONE]`, or close it after `stop_after_content` content chunks."""
    out = SSEStream()
    content = 0
    async with client.stream(method, url, json=json_body, headers=headers) as resp:
        resp.raise_for_status()
        event_id: str | None = None
        data: list[str] = []
        async for line in resp.aiter_lines():
            if line.startswith(":"):
                out.comments += 1
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                payload = "\n".join(data)
                out.events.append((event_id, payload))
                event_id, data = None, []
                if payload == "[DONE]":
                    out.done = True
                    break
                if '"content":"' in payload and '"content":""' not in payload:
                    content += 1
                    if stop_after_content is not None and content >= stop_after_content:
                        break
    return out
