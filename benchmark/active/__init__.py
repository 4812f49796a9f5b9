"""Federated active learning on FLAIR: random, entropy and KAFAL (Cao et
al., ICCV 2023) choosing which images of each user get labelled
(`python -m benchmark.active_main`, docs/active_learning.md)."""
