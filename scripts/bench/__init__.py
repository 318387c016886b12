"""The training benchmark behind ``scripts/bench_train.py``, one concept per module.

- ``presets``: model/batch sizes and the training settings every runner shares;
- ``workload``: the random-weight model, the fixed-shape data rows and the directions file every runner uses;
- ``harness``: the step hand-over between runner threads, the interleaved rounds and their timing;
- ``runners``: the plain loop, our LightningModule (with and without each projection) and TRL;
- ``memory``: peak-memory probes (one subprocess per runner) and the tensors a projector holds;
- ``report``: ratios, ``missing``, the JSON record and its markdown table;
- ``targets``: the issues' thresholds, one declared table (the measured tables are in docs/benchmarks.md).
"""
