"""Measurements on any machine: where they ran and what they cost.

- :mod:`.energy` / :mod:`.tegrastats`: energy per question (tegrastats, RAPL or CPU time), peak RSS.
- :mod:`.inference`: batch-1 latency and throughput of the Keras full model (``elma bench``).
- :mod:`.harness`: the spoken-QA pipeline stage by stage, early exit against no early exit
  (``python -m elma_utils.bench.harness``).
- :mod:`.environment`: what this machine is and what is set up on it (notebook 00).

Nothing is imported here, so ``elma_utils.bench.energy`` stays light on the device.
"""
