"""Evidence on a real pretrained model, GRPO: fixed reference vs BEMA reference vs BEMA reference + self-distillation.

    python benchmarks/evidence_grpo.py --full --threads 1   # SmolLM2-135M-Instruct on stdlib code, hours on CPU
    python benchmarks/evidence_grpo.py --tiny               # seconds: tiny random model (what CI runs)

See ``python benchmarks/evidence_grpo.py --help`` and docs/evidence.md, study (d).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness lives in the checkout's experiments/
from experiments.grpo_study import main

if __name__ == "__main__":
    sys.exit(main())
