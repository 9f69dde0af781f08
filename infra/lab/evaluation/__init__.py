"""Protocol T1: temporal, prequential next-item evaluation of reelstream and baselines.

See ``../shared/EVALUATION.md`` in the handoff folder and the README's Quality section.
"""
