"""Archive-scale scoring: ``python -m scoring SOURCE --model DIR --out results.parquet``.

Scores every file of a folder or manifest with one model through the same ``cxr_core`` path as
the app (``pipeline.classify_many``, ``quality``, the Batch review row), on this machine or on a
Ray cluster (``--engine ray``); see README.md beside this file.
"""
