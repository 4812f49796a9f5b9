"""Stage 1: raw FLAIR (download, Hugging Face or pfl-research copies, generated
data) to per-user TFRecords.
"""
