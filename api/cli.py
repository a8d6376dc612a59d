"""`llmq`: submit a batch and watch it, or look at one.

    llmq batch submit requests.jsonl [--out DIR] [--metadata key=value ...]
    llmq batch status batch_...

`submit` uploads the JSONL file, creates the batch, draws a progress bar (done/failed/
total, rate, ETA) until the batch ends, then downloads the output and error files.
Ctrl-C stops watching; the batch keeps running (`llmq batch status` shows it).
The server is LLMQ_BASE_URL (default http://localhost:8000/v1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_line(batch: dict[str, Any], started: float, width: int = 30) -> str:
    counts = batch.get("request_counts") or {}
    total, done, failed = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
    finished = done + failed
    frac = finished / total if total else 0.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    elapsed = time.monotonic() - started
    rate = finished / elapsed if elapsed > 0 else 0.0
    eta = fmt_duration((total - finished) / rate) if rate > 0 and total else "--:--"
    return f"[{bar}] {finished}/{total} ({done} done, {failed} failed) {rate:.1f} lines/s ETA {eta} {batch['status']}"


class Client:
    def __init__(self, base_url: str, api_key: str | None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=300)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.http.request(method, path, **kw)
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise SystemExit(f"error {resp.status_code}: {message}")
        return resp.json()

    def download(self, file_id: str, dest: Path) -> None:
        with self.http.stream("GET", f"/files/{file_id}/content") as resp:
            resp.raise_for_status()
            with open(dest, "wb") as f:
                for chunk in resp.iter_bytes():
                    f.write(chunk)


def watch(client: Client, batch_id: str, out: Path | None, interval: float = 1.0) -> int:
    started = time.monotonic()
    tty = sys.stderr.isatty()
    batch: dict[str, Any] = {}
    try:
        while True:
            batch = client.call("GET", f"/batches/{batch_id}")
            line = progress_line(batch, started)
            sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
            sys.stderr.flush()
            if batch["status"] in TERMINAL:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nstopped watching; the batch keeps running: llmq batch status {batch_id}\n")
        return 130
    sys.stderr.write("\n")
    if batch.get("errors"):
        for err in batch["errors"]["data"]:
            where = f" (line {err['line']})" if err.get("line") else ""
            sys.stderr.write(f"  {err['code']}{where}: {err['message']}\n")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for kind in ("output_file_id", "error_file_id"):
            if batch.get(kind):
                dest = out / f"{batch_id}_{kind.split('_')[0]}.jsonl"
                client.download(batch[kind], dest)
                print(dest)
    return 0 if batch["status"] == "completed" else 1


def first_url(path: Path) -> str:
    """The url of a batch file's first line (every line's must be the batch's endpoint)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    break
                return url if isinstance(url, str) else "/v1/chat/completions"
    return "/v1/chat/completions"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmq", description="llmq batch client")
    parser.add_argument("--base-url", default=os.environ.get("LLMQ_BASE_URL", "http://localhost:8000/v1"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    sub = parser.add_subparsers(dest="group", required=True)
    batch = sub.add_parser("batch").add_subparsers(dest="command", required=True)
    submit = batch.add_parser("submit", help="upload a JSONL file, run it as a batch, watch it, download results")
    submit.add_argument("file", type=Path)
    submit.add_argument("--out", type=Path, default=Path("."), help="where the output and error files go")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument(
        "--endpoint", default=None, help="the batch's endpoint (default: the url of the file's first line)"
    )
    status = batch.add_parser("status", help="show a batch")
    status.add_argument("batch_id")
    status.add_argument("--watch", action="store_true", help="follow it with a progress bar until it ends")
    status.add_argument("--out", type=Path, default=None, help="with --watch: download the results here")
    args = parser.parse_args(argv)
    client = Client(args.base_url, args.api_key)

    if args.command == "submit":
        metadata = dict(kv.split("=", 1) for kv in args.metadata) or None
        endpoint = args.endpoint or first_url(args.file)
        with open(args.file, "rb") as f:
            uploaded = client.call("POST", "/files", files={"file": (args.file.name, f)}, data={"purpose": "batch"})
        created = client.call(
            "POST",
            "/batches",
            json={
                "input_file_id": uploaded["id"],
                "endpoint": endpoint,
                "completion_window": "24h",
                "metadata": metadata,
            },
        )
        sys.stderr.write(f"batch {created['id']} (input {uploaded['id']}, {uploaded['bytes']} bytes)\n")
        return watch(client, created["id"], args.out)
    if args.watch:
        return watch(client, args.batch_id, args.out)
    print(json.dumps(client.call("GET", f"/batches/{args.batch_id}"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
