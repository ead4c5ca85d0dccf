"""The reporting side: what the runs recorded, as tables and figures for people and LaTeX for the report.

- ``report.tables``: the comparison of every model with real data and the ablations table
  (``python -m report.tables``, which also writes the extension tables).
- ``report.extension_tables``: the runs beyond the assignment side by side.
- ``report.make_numbers``: every number of report.tex as a LaTeX macro, and its tables' rows.
- ``report.make_submission``: the hand-in zip.

The yardstick itself (the measures, the classifier, ``evaluate_samples``, the real-data reference rows)
is the ``evaluation`` package; nothing here measures. Every run is read through
``harness.schema.read``, so a reader takes a run's settings, milestones and figure names from what the
run recorded and never re-derives what a script did.
"""
