"""The lab: training, evaluation and ablations over the serving code in ``shared/``.

``shared/`` holds what the services run: the models' networks, inference and checkpoint
loading, retrieval and ranking. Everything that fits or judges those models lives here
and only here:

- ``train`` (``make train``): trains the four deployed models on TRAIN and writes their
  checkpoints into ``models/``; the trainers and checkpoint writers are in ``training``;
- ``eval`` (``make eval``, ``make eval-stream``): protocol T1 over the pipeline and its
  baselines, in process or through the running stack; the protocol itself (split,
  metrics, baselines, harness, reports) is in ``evaluation``;
- ``ablation`` (``make ablation``): what each part of the trained item encoder adds.

The lab imports ``shared/``; nothing in ``shared/`` or ``services/`` imports the lab.
"""
