"""The trainers of the models in ``shared/models`` and the checkpoints they write.

One module per trained model (``fusion``, ``residual``, ``ranker``; ``rating`` writes
the rating predictor fitted by ``shared.models.rating``), each with its training
config, its training loop and its ``save_*`` checkpoint writer; ``checkpoint`` writes
the folder ``shared.models.checkpoint`` reads, and ``best_epoch`` is the early stopping
they share. ``infra.lab.train`` (``make train``) runs them in order.
"""
