"""Statistics, tables and figures of datasets (explore) and of demo runs.

`dataset_stats`, `dataset_figures` and `dataset_report` make the report of
`python -m benchmark.explore`; `demo_summary` the results table and figure of
`python -m benchmark.demo`.
"""
