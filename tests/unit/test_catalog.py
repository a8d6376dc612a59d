"""The API's tokenizer loading: first use from several threads at once (the warm-up and
the first requests after a start) must not fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.catalog import ChatTokenizer
from common.schemas import ChatCompletionRequest

PROBE = """
import threading
from api.catalog import auto_tokenizer
errors = []
def load():
    try:
        auto_tokenizer()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(errors), errors[:1])
"""


def test_first_tokenizer_import_from_many_threads_at_once():
    # A fresh interpreter: transformers must not be imported yet. Without the lock in
    # api.catalog, 6 or 7 of 8 threads got "cannot import name 'AutoTokenizer'".
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[0] == "0", out.stdout


MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
TEXTS = [
    "What is the capital of France?",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",  # the template's special tokens
    "a  b   c\t\td\n\n\ne   ",
    "naïve café, Øresund, Ελληνικά, Русский, 中文, 한국어, العربية, 🙂🚀",
    "<tool_call>\n" + json.dumps({"name": "f", "arguments": {"x": [1, 2.5, None]}}) + "\n</tool_call>",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def chat_tokenizer() -> ChatTokenizer:
    if not (MODEL / "tokenizer.json").is_file():
        pytest.skip("the default model is not installed (make model)")
    return ChatTokenizer(MODEL)


def test_the_default_model_encodes_through_the_fast_encoder_as_vllm_does(chat_tokenizer):
    # vLLM's own tokenizer loader (what `vllm serve` tokenizes with) is the reference.
    from vllm.tokenizers import get_tokenizer

    reference = get_tokenizer(str(MODEL))
    assert chat_tokenizer._fast is not None
    for text in TEXTS:
        for special in (False, True):
            assert chat_tokenizer.encode(text, add_special_tokens=special) == reference.encode(
                text, add_special_tokens=special
            ), (text[:40], special)
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[3]}]}
    )
    rendered = reference.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[3]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat_tokenizer.encode_chat(req) == reference.encode(rendered, add_special_tokens=False)


def test_a_tokenizer_that_splits_special_tokens_keeps_transformers_call(chat_tokenizer):
    chat_tokenizer._tok.split_special_tokens = True
    try:
        assert chat_tokenizer._fast_encoder() is None
    finally:
        chat_tokenizer._tok.split_special_tokens = False
