"""Training throughput: a plain PyTorch + PEFT loop vs. our LightningModule vs. each projection vs. TRL.

    python scripts/bench_train.py --preset cpu-small --out artifacts/bench/train.json [--md F.md] [--steps N]

Every runner trains the same Qwen3-architecture model (random weights, built in-process by ``tiny.py``;
nothing is downloaded) with the same LoRA, precision, optimizer and batch shape, on the same data, each in
its framework's own training loop, interleaved step by step in one process. The code is in ``scripts/bench/``
(``presets``, ``workload``, ``harness``, ``runners``, ``memory``, ``report``, ``targets``: see its
``__init__``); what it measures, how, and the measured tables are in docs/benchmarks.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the ``bench`` package, also when imported

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
