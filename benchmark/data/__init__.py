"""Stage 2: prepared TFRecords to client datasets: formats, labels, the input
pipeline, bad-record triage, FLAIR-IID.
"""
