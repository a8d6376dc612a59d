"""Chat template rendering as `vllm serve` renders it (vllm/renderers/hf.py and
chat_utils.py), without vLLM: the same messages, tools and template arguments reach the
same HF `apply_chat_template`, so the prompt tokens are the ones vLLM would compute.

- messages: `ChatMessage.for_template` (content as a string, or as text parts for
  templates that loop over content; tool-call arguments as dicts; reasoning; tool ids);
- a `developer` message becomes `system` (system messages merged into one, first) when
  the template does not know the developer role;
- template arguments: `tools` (unless the request has none), the request's
  `chat_template_kwargs` (only the names the template uses, or HF's own), then
  `add_generation_prompt` and `reasoning_effort` (with `enable_thinking` derived from it
  when not given), filtered as vLLM filters them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes

from common.schemas import ChatCompletionRequest


@functools.lru_cache(maxsize=32)
def _ast(template: str) -> jinja2.nodes.Template | None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        compiled = _compile_jinja_template(template)
        return compiled.environment.parse(template)
    except Exception:
        return None


def _is_content(node: jinja2.nodes.Node) -> bool:
    """`x['content']`, `x.content`, `content` (possibly filtered or sliced)."""
    if isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test):
        return node.node is not None and _is_content(node.node)
    if isinstance(node, jinja2.nodes.Getitem):
        if isinstance(node.arg, jinja2.nodes.Const):
            return node.arg.value == "content"
        return isinstance(node.arg, jinja2.nodes.Slice) and _is_content(node.node)
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, jinja2.nodes.Name) and node.name == "content"


@functools.lru_cache(maxsize=32)
def content_format(template: str) -> str:
    """`openai` when the template loops over a message's content (it expects a list of
    parts), else `string` (vLLM's `_detect_content_format`, simplified)."""
    ast = _ast(template)
    if ast is None:
        return "string"
    for loop in ast.find_all(jinja2.nodes.For):
        if _is_content(loop.iter):
            return "openai"
    return "string"


@functools.lru_cache(maxsize=32)
def template_vars(template: str) -> frozenset[str]:
    ast = _ast(template)
    return frozenset(jinja2.meta.find_undeclared_variables(ast)) if ast is not None else frozenset()


@functools.lru_cache(maxsize=1)
def hf_base_params() -> frozenset[str]:
    from transformers import PythonBackend

    sig = inspect.signature(PythonBackend.apply_chat_template)
    return frozenset(
        p.name
        for p in sig.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    )


def _merge(defaults: dict[str, Any] | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's `merge_kwargs`: overrides win unless None or "auto"."""
    return (defaults or {}) | {k: v for k, v in (overrides or {}).items() if v is not None and v != "auto"}


def supports_developer_role(template: str) -> bool:
    return '"developer"' in template or "'developer'" in template


def consolidate_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's `_convert_developer_to_system` then `_consolidate_system_messages`."""
    converted = []
    for msg in messages:
        if msg["role"] == "developer":
            msg = {k: v for k, v in msg.items() if k != "tools"} | {"role": "system"}
        converted.append(msg)
    contents: list[str] = []
    rest: list[dict[str, Any]] = []
    needs = False
    for i, msg in enumerate(converted):
        if msg["role"] == "system":
            if i > 0 or contents:
                needs = True
            content = msg.get("content", "")
            if isinstance(content, list):
                content = "\n".join(p["text"] for p in content if isinstance(p, dict) and "text" in p)
            if content:
                contents.append(content)
        else:
            rest.append(msg)
    if not needs:
        return converted
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]


def render_arguments(req: ChatCompletionRequest, template: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(conversation, keyword arguments) for `apply_chat_template`, as vLLM passes them."""
    fmt = content_format(template)
    conversation = [m.for_template(fmt) for m in req.messages]
    if any(m["role"] == "developer" for m in conversation) and not supports_developer_role(template):
        conversation = consolidate_system(conversation)
    # vLLM (online_renderer): tools go to the template whenever the request has them
    # (tool_choice "none" included: --exclude-tools-when-tool-choice-none is off).
    tools = [t.for_template() for t in req.tools] if req.tools else None
    extra: dict[str, Any] = {"add_generation_prompt": True, "continue_final_message": False}
    if req.reasoning_effort is not None:
        extra["reasoning_effort"] = req.reasoning_effort
    user = req.chat_template_kwargs or {}
    if req.reasoning_effort is not None and "enable_thinking" not in user:
        extra["enable_thinking"] = req.reasoning_effort != "none"
    kwargs = _merge({"tools": tools}, _merge(user, extra))
    accepted = template_vars(template) | hf_base_params()
    kwargs = {k: v for k, v in kwargs.items() if k in accepted and k not in ("chat_template", "tokenize")}
    kwargs.setdefault("tools", None)
    return conversation, kwargs
