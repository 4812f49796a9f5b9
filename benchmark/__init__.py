"""FLAIR benchmark suite: data preparation, ResNet-18, central and federated training."""
