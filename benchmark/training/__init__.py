"""Stage 4: training: configurations, FedAvg, the round loop, central training,
optimizers, DP, outputs and run directories.
"""
