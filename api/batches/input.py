"""A batch's input file: checked as a whole before anything runs, then read line by line."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from common import keys
from common.batches import BatchError

ENDPOINT = "/v1/chat/completions"
# The endpoints a batch may run; every line's url is its batch's endpoint.
ENDPOINTS = (ENDPOINT, "/v1/completions", "/v1/responses")
# A line's job id prefix, by its batch's endpoint.
JOB_PREFIXES = {ENDPOINT: "chatcmpl-", "/v1/completions": "cmpl-", "/v1/responses": "resp_"}
WINDOW_SECONDS = {"24h": 24 * 3600}


class InputLine(BaseModel):
    custom_id: str = Field(min_length=1)
    method: str
    url: str
    body: dict[str, Any]


def line_job_id(batch_id: str, endpoint: str, line: int) -> str:
    """The job id of a batch's input line: `chatcmpl-...`, `cmpl-...` in a batch of
    `/v1/completions`, `resp_...` in one of `/v1/responses` (deterministic:
    re-dispatching is idempotent)."""
    job_id = keys.batch_job_id(batch_id, line)
    return JOB_PREFIXES.get(endpoint, "chatcmpl-") + job_id.removeprefix("chatcmpl-")


def scan_input(path: Path, max_lines: int, max_bytes: int, endpoint: str = ENDPOINT) -> tuple[int, list[BatchError]]:
    """Check a batch input file as a whole: size, JSONL, line shape (its url the batch's
    endpoint), unique custom_ids. Returns (line count, errors)."""
    size = path.stat().st_size
    if size > max_bytes:
        return 0, [BatchError(code="file_too_large", message=f"the input file is {size} bytes; at most {max_bytes}")]
    errors: list[BatchError] = []
    # Digests of the custom_ids seen (16 bytes each, whatever an id's length), so the
    # check's memory does not grow with the file's bytes.
    seen: set[bytes] = set()
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            count += 1
            if count > max_lines:
                errors.append(
                    BatchError(code="too_many_lines", message=f"the input has more than {max_lines} lines", line=number)
                )
                break
            try:
                line = InputLine.model_validate_json(raw)
            except ValidationError as exc:
                kind = "invalid_json_line" if exc.errors()[0]["type"] == "json_invalid" else "invalid_request"
                errors.append(BatchError(code=kind, message=f"line {number}: {exc.errors()[0]['msg']}", line=number))
            else:
                if line.method != "POST":
                    errors.append(BatchError(code="invalid_method", message="method must be POST", line=number))
                if line.url != endpoint:
                    errors.append(
                        BatchError(
                            code="invalid_url", message=f"url must be {endpoint} (the batch's endpoint)", line=number
                        )
                    )
                digest = hashlib.blake2b(line.custom_id.encode(), digest_size=16).digest()
                if digest in seen:
                    errors.append(
                        BatchError(
                            code="duplicate_custom_id", message=f"duplicate custom_id {line.custom_id!r}", line=number
                        )
                    )
                seen.add(digest)
            if len(errors) >= 100:
                break
    if count == 0 and not errors:
        errors.append(BatchError(code="empty_file", message="the input file has no requests"))
    return count, errors


def iter_lines(path: Path, start: int = 0) -> Iterator[tuple[int, InputLine]]:
    """(index, line) of the request lines from `start` on (blank lines do not count)."""
    index = -1
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            index += 1
            if index >= start:
                yield index, InputLine.model_validate_json(raw)
