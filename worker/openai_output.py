"""OpenAI-shaped answers for rich jobs (issue 10), made with vLLM's own machinery.

A rich job (`JobRequest.output`) carries the OpenAI request body the API validated. This
module does with it what `vllm serve` does with the same request, reusing vLLM's code
rather than a second implementation:

- the body becomes vLLM's protocol request (`ChatCompletionRequest` / `CompletionRequest`,
  with its validators), the composed parser class (`ParserManager.get_parser`, built once)
  adjusts it when vLLM's renderer would (`Parser.adjust_request`: structured outputs for
  tool calls, special tokens kept), and `to_sampling_params` gives the SamplingParams
  (structured outputs, logprobs, stop, penalties, the model's generation-config defaults);
- each engine step's `RequestOutput` becomes `ChoiceDelta`s as vLLM's streaming path
  builds its chunks (`OpenAIServingChat.chat_completion_stream_generator`,
  `OpenAIServingCompletion.completion_stream_generator`): one parser per choice
  (`parse_delta`), content / reasoning / tool-call deltas, logprobs formatted by vLLM's own
  `_create_chat_logprobs` / `_create_completion_logprobs`, echo, and the streaming finish
  reason;
- when a chat choice ends, its whole `message` as the non-streaming path builds it
  (`chat_completion_full_generator`: a fresh parser, `parse` of the whole text, the
  named / required / auto / none branches, the non-streaming finish reason).

Nothing here needs a running engine: `OpenAIFrontend` wants a tokenizer (and optionally
the engine's ModelConfig), so tests drive it with real token streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm.entrypoints.generate.base.protocol import DeltaMessage, ToolCall
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
    ChatCompletionResponseChoice,
    ChatMessage,
)
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.outputs import RequestOutput
from vllm.parser import ParserManager
from vllm.parser.abstract_parser import Parser
from vllm.reasoning import ReasoningParserManager
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.tool_parsers import ToolParserManager

from common.jobs import ChoiceDelta, JobRequest

# vLLM's finish reasons as llmq names them ("abort": the job was cancelled).
FINISH_REASONS = {"abort": "cancelled"}
# vLLM's role for generated messages (`vllm serve --response-role`, default "assistant").
RESPONSE_ROLE = "assistant"
# Stands in for the prompt (already rendered and tokenized by the API) when the body is
# validated as vLLM's protocol request: its validators require one.
_PLACEHOLDER_MESSAGES = [{"role": "user", "content": ""}]
_PLACEHOLDER_PROMPT = [0]

# Errors vLLM raises for a request it refuses (a 400 for the client).
REQUEST_ERRORS: tuple[type[Exception], ...] = (VLLMClientError, ValueError, TypeError)


class ParserConfigError(RuntimeError):
    """TOOL_CALL_PARSER / REASONING_PARSER / ENABLE_AUTO_TOOL_CHOICE cannot be served."""


class GenerationFailed(RuntimeError):
    """vLLM ended a choice with finish reason `error` (an internal, retryable failure)."""


def _formatter(cls: type[Any]) -> Any:
    """An instance of vLLM's serving class for its logprob formatting methods only
    (`_create_chat_logprobs`, `_create_completion_logprobs`: they read nothing but
    `return_tokens_as_token_ids` and their own helper methods). Its __init__, which wants
    a running engine, is not run."""
    obj = object.__new__(cls)
    obj.return_tokens_as_token_ids = False
    return obj


_CHAT_FORMAT = _formatter(OpenAIServingChat)
_COMPLETION_FORMAT = _formatter(OpenAIServingCompletion)


def prompt_logprobs_json(prompt_logprobs: Sequence[Any] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt logprobs as its server serializes them (clamp_prompt_logprobs: -inf
    as -9999.0): per prompt token None or {token id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    out: list[dict[str, Any] | None] = []
    for step in prompt_logprobs:
        if step is None:
            out.append(None)
            continue
        out.append(
            {
                str(token_id): {
                    "logprob": max(lp.logprob, -9999.0),
                    "rank": lp.rank,
                    "decoded_token": lp.decoded_token,
                }
                for token_id, lp in step.items()
            }
        )
    return out


def finish_reason(reason: str | None) -> str | None:
    return FINISH_REASONS.get(reason, reason) if reason else None


def check_parser_names(tool_call_parser: str, reasoning_parser: str, auto_tool_choice: bool | None) -> None:
    """Refuse, before anything is loaded, a parser name vLLM does not know (as `vllm
    serve` does at start), and auto tool choice without a tool-call parser."""
    if tool_call_parser and tool_call_parser not in ToolParserManager.list_registered():
        known = ", ".join(ToolParserManager.list_registered())
        raise ParserConfigError(f"TOOL_CALL_PARSER={tool_call_parser!r}: vLLM has no such tool-call parser ({known})")
    if reasoning_parser and reasoning_parser not in ReasoningParserManager.list_registered():
        known = ", ".join(ReasoningParserManager.list_registered())
        raise ParserConfigError(f"REASONING_PARSER={reasoning_parser!r}: vLLM has no such reasoning parser ({known})")
    if auto_tool_choice and not tool_call_parser:
        raise ParserConfigError("ENABLE_AUTO_TOOL_CHOICE=true requires TOOL_CALL_PARSER (as vllm serve's flags)")


@dataclass
class RichRequest:
    """A rich job as vLLM's server would run it: the (adjusted) protocol request, and per
    prompt the SamplingParams and the extra `AsyncLLM.generate` arguments."""

    api: str
    request: ChatCompletionRequest | CompletionRequest
    params: list[SamplingParams]
    generate_kwargs: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpenAIFrontend:
    """What vLLM's OpenAI server holds once per model: tokenizer, composed parser class,
    auto-tool flag, model config and the model's default sampling parameters."""

    tokenizer: Any
    parser_cls: type[Parser] | None = None
    enable_auto_tools: bool = False
    model_config: Any = None
    default_sampling_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        *,
        tool_call_parser: str = "",
        reasoning_parser: str = "",
        enable_auto_tool_choice: bool | None = None,
        model_config: Any = None,
        model_name: str | None = None,
    ) -> OpenAIFrontend:
        """As `OpenAIServingChat.__init__` builds its parser class (`ParserManager.get_parser`,
        which also checks the tokenizer has what the parsers need)."""
        auto = bool(tool_call_parser) if enable_auto_tool_choice is None else enable_auto_tool_choice
        check_parser_names(tool_call_parser, reasoning_parser, auto)
        try:
            parser_cls = ParserManager.get_parser(
                tool_parser_name=tool_call_parser or None,
                reasoning_parser_name=reasoning_parser or None,
                enable_auto_tools=auto,
                model_name=model_name,
                is_harmony=bool(model_config is not None and model_config.hf_config.model_type == "gpt_oss"),
                tokenizer=tokenizer,
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise ParserConfigError(str(exc)) from exc
        defaults = model_config.get_diff_sampling_param() if model_config is not None else {}
        return cls(tokenizer, parser_cls, auto, model_config, defaults)

    # -- per request ---------------------------------------------------------------------

    def make_parser(self, request: RichRequest) -> Parser | None:
        """A parser instance (stateful: one per choice), as `OpenAIServingChat._make_parser`."""
        if self.parser_cls is None or request.api != "chat":
            return None
        return self.parser_cls(
            self.tokenizer,
            request.request.tools,  # type: ignore[union-attr,arg-type]
            chat_template_kwargs=request.chat_template_kwargs,
            model_config=self.model_config,
        )

    def prepare(self, job: JobRequest) -> RichRequest:
        """vLLM's protocol request and SamplingParams for a rich job. Raises what vLLM
        raises for an invalid request (REQUEST_ERRORS)."""
        assert job.output is not None
        spec = job.output
        body = {k: v for k, v in spec.body.items() if k not in ("messages", "prompt")}
        if spec.api == "chat":
            chat = ChatCompletionRequest.model_validate({**body, "messages": _PLACEHOLDER_MESSAGES})
            template_kwargs = chat.build_chat_params(None, "auto").with_defaults({}).chat_template_kwargs or {}
            rich = RichRequest("chat", chat, [], [], template_kwargs)
            self._check_tool_choice(chat)
            # As vLLM's renderer (OnlineRenderer.preprocess_chat): a parser instance of its
            # own adjusts the request in place; vllm serve goes on with the same object.
            if self.parser_cls is not None and (
                self.parser_cls.always_adjust_request
                or self.parser_cls.reasoning_parser_cls is not None
                or chat.tool_choice != "none"
            ):
                adjuster = self.make_parser(rich)
                assert adjuster is not None
                adjuster.adjust_request(chat)
            # As OpenAIServingChat._create_chat_completion: the non-streaming parser decides
            # whether generation starts after reasoning (structured outputs wait for it).
            parser = self.make_parser(rich)
            kwargs: dict[str, Any] = {
                "reasoning_ended": chat.resolve_reasoning_ended(parser, job.prompt_token_ids),
                "reasoning_parser_kwargs": {"chat_template_kwargs": template_kwargs}
                if parser is not None and parser.reasoning_parser is not None
                else None,
            }
            rich.params = [self._params(chat, job) for _ in job.prompts]
            rich.generate_kwargs = [kwargs for _ in job.prompts]
            return rich
        completion = CompletionRequest.model_validate({**body, "prompt": _PLACEHOLDER_PROMPT})
        return RichRequest(
            "completion",
            completion,
            [self._params(completion, job) for _ in job.prompts],
            [{} for _ in job.prompts],
        )

    def _check_tool_choice(self, chat: ChatCompletionRequest) -> None:
        """OnlineRenderer.render_chat's refusals: a tool_choice other than none needs the
        tool parser (and `auto` needs auto tool choice on)."""
        if self.parser_cls is not None and self.parser_cls.tool_parser_cls is not None:
            return
        if chat.tool_choice in (None, "none"):
            return
        if chat.tool_choice == "auto" and not self.enable_auto_tools:
            raise VLLMValidationError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            )
        if chat.tool_choice != "auto":
            if isinstance(chat.tool_choice, ChatCompletionNamedToolChoiceParam):
                desc = f'function "{chat.tool_choice.function.name}"'
            else:
                desc = f'"{chat.tool_choice}"'
            raise VLLMValidationError(f"tool_choice={desc} requires --tool-call-parser to be set")

    def _params(self, request: ChatCompletionRequest | CompletionRequest, job: JobRequest) -> SamplingParams:
        params = request.to_sampling_params(job.sampling.max_tokens, self.default_sampling_params)
        # Streamed step by step whatever the client asked (the API renders both shapes from
        # the deltas); the budget and n are the job's (the runtime may shrink them).
        params.output_kind = RequestOutputKind.DELTA
        params.n = job.sampling.n
        params.max_tokens = job.sampling.max_tokens
        params.min_tokens = min(job.sampling.min_tokens, job.sampling.max_tokens)
        return params

    def processor(self, request: RichRequest, job: JobRequest, prompt: int = 0) -> ChatOutput | CompletionOutput:
        """The output processor of prompt `prompt`'s sub-request (choices p*n + j)."""
        if request.api == "chat":
            return ChatOutput(self, request, job, prompt)
        return CompletionOutput(self, request, job, prompt)


class _Output:
    def __init__(self, frontend: OpenAIFrontend, request: RichRequest, job: JobRequest, prompt: int):
        self.frontend = frontend
        self.rich = request
        self.n = job.sampling.n
        self.base = prompt * self.n
        self.prompt_token_ids = job.prompts[prompt]
        self.num_tokens = [0] * self.n
        self.finished = [False] * self.n

    def process(self, res: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for output in res.outputs:
            i = output.index
            if self.finished[i]:
                continue
            if output.finish_reason == "error":
                raise GenerationFailed("the engine failed this request (finish reason 'error'); retry it")
            delta = self._delta(res, output)
            self.num_tokens[i] += len(output.token_ids)
            if output.finish_reason is not None:
                self.finished[i] = True
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _delta(self, res: RequestOutput, output: Any) -> ChoiceDelta | None:
        raise NotImplementedError


class ChatOutput(_Output):
    """A chat sub-request's outputs as `chat_completion_stream_generator` streams them,
    plus each choice's non-streaming `message` on its last delta."""

    def __init__(self, frontend: OpenAIFrontend, request: RichRequest, job: JobRequest, prompt: int):
        super().__init__(frontend, request, job, prompt)
        self.request: ChatCompletionRequest = request.request  # type: ignore[assignment]
        self.parsers = [frontend.make_parser(request) for _ in range(self.n)]
        self.tools_streamed = [False] * self.n
        self.texts: list[list[str]] = [[] for _ in range(self.n)]
        self.token_ids: list[list[int]] = [[] for _ in range(self.n)]
        # The ids of the tool calls streamed, by call index (the message reuses them).
        self.streamed_ids: list[dict[int, str]] = [{} for _ in range(self.n)]
        tool_choice = self.request.tool_choice
        self.named_tool = (
            tool_choice.function.name if isinstance(tool_choice, ChatCompletionNamedToolChoiceParam) else None
        )

    def _delta(self, res: RequestOutput, output: Any) -> ChoiceDelta | None:
        request, i = self.request, output.index
        parser = self.parsers[i]
        token_ids = list(output.token_ids)
        done = output.finish_reason is not None
        if not output.text and not token_ids and not self.num_tokens[i] and not done:
            return None  # chunked prefill: nothing yet
        logprobs = None
        if request.logprobs:
            assert output.logprobs is not None, "Did not output logprobs"
            logprobs = _CHAT_FORMAT._create_chat_logprobs(
                token_ids=token_ids,
                top_logprobs=output.logprobs,
                tokenizer=self.frontend.tokenizer,
                num_output_top_logprobs=request.top_logprobs,
                logprob_token_ids=request.logprob_token_ids,
                return_as_token_id=request.return_tokens_as_token_ids,
            )
        message: DeltaMessage | None
        if parser is not None:
            message = parser.parse_delta(
                delta_text=output.text,
                delta_token_ids=token_ids,
                request=request,
                prompt_token_ids=self.prompt_token_ids,
                finished=done,
            )
            if message is not None and message.tool_calls:
                self.tools_streamed[i] = True
            if not request.include_reasoning:
                # vLLM hides per-token metadata that would leak the reasoning.
                logprobs = None
        else:
            message = DeltaMessage(content=output.text)
        self.texts[i].append(output.text)
        self.token_ids[i].extend(token_ids)
        message = maybe_filter_parallel_tool_calls(message or DeltaMessage(), request)
        tool_calls = [tc.model_dump(exclude_none=True) for tc in message.tool_calls] or None
        for tc in tool_calls or []:
            if tc.get("id"):
                self.streamed_ids[i].setdefault(tc["index"], tc["id"])
        reason = None
        if done:
            # As vLLM streams it: "tool_calls" when tools were streamed, the choice is not a
            # named tool choice, and it stopped.
            if self.tools_streamed[i] and not self.named_tool and output.finish_reason == "stop":
                reason = "tool_calls"
            else:
                reason = output.finish_reason or "stop"
        return ChoiceDelta(
            index=self.base + i,
            text=message.content or "",
            token_ids=token_ids,
            finish_reason=finish_reason(reason),
            reasoning=message.reasoning or None,
            tool_calls=tool_calls,
            logprobs=logprobs.model_dump(mode="json") if logprobs is not None else None,
            message=self.final_message(i, output.finish_reason, output.stop_reason) if done else None,
            stop_reason=output.stop_reason if done else None,
        )

    def final_message(self, i: int, vllm_finish: str | None, stop_reason: Any = None) -> dict[str, Any]:
        """Choice i's whole message as `chat_completion_full_generator` builds it from the
        finished output, with its non-streaming finish reason."""
        request, frontend = self.request, self.frontend
        text, token_ids = "".join(self.texts[i]), self.token_ids[i]
        # Parsers are stateful: a fresh one for the whole output, as vLLM's full path.
        parser = frontend.make_parser(self.rich)
        tool_parser_cls = frontend.parser_cls.tool_parser_cls if frontend.parser_cls is not None else None
        reasoning_tokens = 0
        if parser is not None:
            parser.set_prompt_token_ids(self.prompt_token_ids)
            reasoning, content, tool_calls = parser.parse(
                text, request, enable_auto_tools=frontend.enable_auto_tools, model_output_token_ids=token_ids
            )
            if not request.include_reasoning:
                reasoning = None
            reasoning_tokens = parser.count_reasoning_tokens(token_ids)
        else:
            reasoning, content, tool_calls = None, text, []
        auto_tools_called = False
        is_named = request.tool_choice is not None and type(request.tool_choice) is ChatCompletionNamedToolChoiceParam
        is_required = request.tool_choice == "required"
        if (not frontend.enable_auto_tools or not tool_parser_cls) and not is_named and not is_required:
            message = ChatMessage(role=RESPONSE_ROLE, reasoning=reasoning, content=content)
        elif is_named or is_required:
            message = ChatMessage(
                role=RESPONSE_ROLE,
                reasoning=reasoning,
                content=content or "",
                tool_calls=[ToolCall(id=tc.id or make_tool_call_id(), function=tc) for tc in tool_calls or []],
            )
        elif not request.tool_choice or request.tool_choice == "none":
            message = ChatMessage(role=RESPONSE_ROLE, reasoning=reasoning, content=content)
        elif request.tools and request.tool_choice == "auto" and frontend.enable_auto_tools and tool_parser_cls:
            auto_tools_called = bool(tool_calls)
            message = ChatMessage(
                role=RESPONSE_ROLE,
                reasoning=reasoning,
                content=content,
                tool_calls=[ToolCall(id=tc.id or make_tool_call_id(), function=tc) for tc in tool_calls or []],
            )
        else:
            message = ChatMessage(role=RESPONSE_ROLE, reasoning=reasoning, content=content)
        # In OpenAI's API (and vLLM's), "tool_calls" for auto or required tool calls, "stop"
        # for named ones; unlike the stream, auto counts even a call cut off by the budget.
        is_tool_calls = auto_tools_called or (request.tool_choice == "required" and vllm_finish == "stop")
        reason = "tool_calls" if is_tool_calls else vllm_finish or "stop"
        choice = maybe_filter_parallel_tool_calls(
            ChatCompletionResponseChoice(index=i, message=message, finish_reason=reason, stop_reason=stop_reason),
            request,
        )
        calls = [tc.model_dump(mode="json") for tc in choice.message.tool_calls]
        # The same ids as the calls streamed (vLLM makes both up at random; one job's stream
        # and result agree).
        for k, call in enumerate(calls):
            streamed = self.streamed_ids[i].get(k)
            if streamed:
                call["id"] = streamed
        return {
            "content": choice.message.content,
            "reasoning": choice.message.reasoning,
            "tool_calls": calls,
            "finish_reason": finish_reason(reason),
            # For usage.completion_tokens_details (vLLM reports it when a reasoning parser is set).
            "reasoning_tokens": reasoning_tokens,
        }


class CompletionOutput(_Output):
    """A completion sub-request's outputs as `completion_stream_generator` streams them:
    echo (the prompt's text and logprobs before the first tokens), logprobs with text
    offsets running on across deltas."""

    def __init__(self, frontend: OpenAIFrontend, request: RichRequest, job: JobRequest, prompt: int):
        super().__init__(frontend, request, job, prompt)
        self.request: CompletionRequest = request.request  # type: ignore[assignment]
        echo_texts = job.output.echo_texts if job.output is not None else None
        self.echo_text = echo_texts[prompt] if self.request.echo and echo_texts else ""
        self.echoed = [False] * self.n
        self.next_offset = [0] * self.n
        self.prompt_logprobs: Sequence[Any] | None = None

    def _delta(self, res: RequestOutput, output: Any) -> ChoiceDelta | None:
        request, i = self.request, output.index
        if self.prompt_logprobs is None and res.prompt_logprobs is not None:
            # Sent with the first output only; every choice of this prompt echoes them.
            self.prompt_logprobs = res.prompt_logprobs
        token_ids = list(output.token_ids)
        out_logprobs: Sequence[Any] | None
        first = not self.echoed[i]
        if request.echo and not self.echoed[i]:
            text = self.echo_text + output.text
            logprob_ids = [*self.prompt_token_ids, *token_ids]
            out_logprobs = [*(self.prompt_logprobs or []), *(output.logprobs or [])]
            self.echoed[i] = True
        else:
            text, logprob_ids, out_logprobs = output.text, token_ids, output.logprobs
            if not text and not token_ids and not self.num_tokens[i] and output.finish_reason is None:
                return None  # chunked prefill: nothing yet
        logprobs = None
        if request.logprobs is not None:
            assert out_logprobs is not None, "Did not output logprobs"
            formatted = _COMPLETION_FORMAT._create_completion_logprobs(
                token_ids=logprob_ids,
                top_logprobs=out_logprobs,
                num_output_top_logprobs=request.logprobs,
                tokenizer=self.frontend.tokenizer,
                logprob_token_ids=request.logprob_token_ids,
                initial_text_offset=self.next_offset[i],
                return_as_token_id=request.return_tokens_as_token_ids,
            )
            # Advance by the tokens reported, not by the text (held back for stop strings).
            if formatted.tokens:
                self.next_offset[i] = formatted.text_offset[-1] + len(formatted.tokens[-1])
            logprobs = formatted.model_dump(mode="json")
        # The first delta of each choice: what vLLM's non-streaming answer carries
        # (`prompt_logprobs`, when asked for by echo or prompt_logprobs) and its stream
        # sends with the echo (`prompt_token_ids`).
        self.echoed[i] = True
        return ChoiceDelta(
            index=self.base + i,
            text=text,
            token_ids=token_ids,
            finish_reason=finish_reason(output.finish_reason),
            logprobs=logprobs,
            stop_reason=output.stop_reason if output.finish_reason is not None else None,
            prompt_token_ids=list(self.prompt_token_ids) if first and request.echo else None,
            prompt_logprobs=prompt_logprobs_json(self.prompt_logprobs) if first else None,
        )
