"""Where FedAvg rounds run: in this process, in TFF's worker, or on Ray
(`factory.open_backend`).

This package's `__init__` imports nothing, so processes that only train
clients (Ray actors: `graph_runner`) or watch processes (`process_guard`)
start without importing TensorFlow Federated."""
