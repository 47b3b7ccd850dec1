"""Evidence on a real pretrained model: EMA/BEMA/DEMA/OUEMA, self-distillation and the DPO reference.

    python benchmarks/evidence.py --full     # SmolLM2-135M-Instruct on stdlib code, ~40 min on 2 CPU cores
    python benchmarks/evidence.py --tiny     # seconds: tiny random model (what CI runs)

See ``python benchmarks/evidence.py --help`` and docs/evidence.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness lives in the checkout's experiments/
from experiments.evidence import main

if __name__ == "__main__":
    sys.exit(main())
