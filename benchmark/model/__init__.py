"""Stage 3: the model: ResNet-18 and its layers, mixed precision, FLAIR's
metrics, weights files.
"""
