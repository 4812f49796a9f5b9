"""Statistics, tables and figures of datasets and of runs.

`dataset_stats`, `dataset_figures` and `dataset_report` make the report of
`python -m benchmark.explore`; `runs`, `results_table` and `run_figures` the
table and curves of `python -m benchmark.report` (also the demo's).
"""
