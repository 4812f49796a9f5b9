"""Statistics, tables and figures of datasets (`python -m benchmark.explore`)."""
