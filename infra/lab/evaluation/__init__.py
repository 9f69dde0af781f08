"""Protocol T1: temporal, prequential next-item evaluation of reelstream and baselines.

The protocol, its metrics and the measured tables are in ``docs/evaluation.md``.
"""
