#!/usr/bin/env bash
# Install both stacks (latest, and Axolotl 0.19's pins) and run the whole test suite in each.
# A stack that runs zero tests, or skips a test module because an import failed, fails.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
stacks=${STACKS:-latest axolotl}
# DeepSpeed on CPU never unlinks its /dev/shm all-reduce buffers (~66 MB per rank per launch, in RAM;
# the tests unlink their own). Remove earlier runs' leftovers of this user unless a launch is running.
if ! pgrep -f "deepspeed.launcher|torchrun|accelerate launch" >/dev/null; then
  rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*
fi
echo "memory: $(free -g | awk '/^Mem:/ {print $7 " GiB available of " $2}'), /dev/shm: $(df -h /dev/shm | awk 'NR==2 {print $3 " used"}')"
status=0
for stack in $stacks; do
  venv=$(bash scripts/venv.sh "$stack") || { echo "::error:: could not build the $stack venv"; status=1; continue; }
  if [ "$stack" = latest ]; then
    "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check . || status=1
  fi
  echo "=== $stack stack: $("$venv/bin/python" -c 'import trl, transformers, peft; print(f"trl {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")') ==="
  PATH="$venv/bin:$PATH" TRL_EMA_STACK="$stack" "$venv/bin/python" -m pytest tests -q -rs -p no:cacheprovider --timeout 900 "$@"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "=== $stack stack: pytest exited $rc ==="
    status=1
  fi
done
exit $status
