"""CHAT_TEMPLATE (issue 10): a jinja file that replaces the model's chat template, as
`vllm serve --chat-template`. Workers render nothing themselves; they publish the
template with their tokenizer files, and the API, which rebuilds the tokenizer from those
files (api/catalog.py), renders prompts with it."""

from __future__ import annotations

from pathlib import Path

from common.settings import Settings


def read_chat_template(settings: Settings) -> bytes | None:
    """CHAT_TEMPLATE's content (None: the model's own template). A missing file stops
    the worker at start."""
    if not settings.chat_template:
        return None
    path = Path(settings.chat_template)
    if not path.is_file():
        raise RuntimeError(f"CHAT_TEMPLATE={path}: no such file")
    return path.read_bytes()


def with_chat_template(files: dict[str, bytes], template: bytes | None) -> dict[str, bytes]:
    """The tokenizer files with `template` as chat_template.jinja, which transformers
    prefers to any template in tokenizer_config.json; a chat_template.json (a processor's
    template) is dropped so that nothing competes with it."""
    if template is None:
        return files
    out = {k: v for k, v in files.items() if k != "chat_template.json"}
    out["chat_template.jinja"] = template
    return out
