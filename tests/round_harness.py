"""Shared by the tests that run one FedAvg round on a backend
(tests/backends/test_backends.py, tests/training/test_optimizers.py): a
deterministic round on the real sample, and checks of what a backend leaves
behind.

The process is built on the tiny network (`--model_layout tiny`): the
backends and optimizers run whatever computation TFF compiled, whatever the
network. Each client's shuffle, crops and flips come from its seed
(`training.cohorts`), so every backend trains the same batches. What
remains is float32 summation order: TFF's worker, the
in-process runner and two Ray actors add client updates in different orders,
which changes results in the last bits (measured: at most 1.2e-7 on weights
of order 0.1); `ATOL` = 1e-5 leaves two orders of magnitude of margin and is
far below one server Adam step (1e-2 with FedAvg, 5e-4 with DP's clip 0.1).
"""

import os
import time
import unittest.mock

import numpy as np

from benchmark.backends import factory
from benchmark.backends import mapreduce
from benchmark.backends import process_guard
from benchmark.core import constants
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import resnet
from benchmark.training import config as config_lib
from benchmark.training import seeds
from benchmark.training import fedavg
from benchmark.training import models

ATOL = 1e-5
COHORT_SIZE = 4
# One batch per client: no user of the sample has more than 8 images.
CLIENT_SETTINGS = dict(image_height=32, image_width=32, client_batch_size=8,
                       max_elements_per_client=8, client_epochs_per_round=1,
                       clients_per_round=COHORT_SIZE, show_progress=False,
                       model_layout=resnet.TINY)


def listening_inodes() -> set[str]:
  """Socket inodes in LISTEN state (TCP, IPv4 and IPv6) on this machine."""
  inodes = set()
  for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(path, encoding="ascii") as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # TCP_LISTEN
          inodes.add(fields[9])
  return inodes


def own_socket_inodes() -> set[str]:
  inodes = set()
  for fd in os.listdir("/proc/self/fd"):
    try:
      target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
      continue
    if target.startswith("socket:["):
      inodes.add(target[len("socket:["):-1])
  return inodes


def alive(processes: dict[int, str]) -> set[int]:
  """The processes of `processes` (pid -> start time, as
  `process_guard.descendants` gives) still running."""
  running = process_guard.descendants(1)
  return {pid for pid, start in processes.items()
          if running.get(pid) == start}


def build(tfrecords_dir, aggregator, weighted, **overrides):
  """The FedAvg process over client ids (`fedavg.build_learning_process`)
  of `CLIENT_SETTINGS` with `overrides` (setting names, `config_lib.build`)
  on the training users of `tfrecords_dir`, initial weights of the same
  network (seed 3) and the sorted training client ids."""
  config = config_lib.build(config_lib.FederatedConfig, dict(
      CLIENT_SETTINGS, tfrecords_dir=tfrecords_dir, save_model_dir="unused",
      **overrides))
  label_spec = label_sets.load_label_spec(tfrecords_dir)
  train = pipeline.load_partition(tfrecords_dir, constants.TRAIN, label_spec)
  process = fedavg.build_learning_process(
      config, label_spec, train, aggregator, weighted=weighted)
  keras_model = models.build_model(config_lib.replace(config, seed=3).model,
                                   label_spec.num_outputs)
  weights = models.model_weights(keras_model)
  return process, weights, sorted(train.client_ids)


def cohort_of(client_ids, round_num=1):
  """Users with 5 images and users with 1 (the sample's sizes), so the
  weighted mean differs from the unweighted one, as the client inputs of
  round `round_num` (`cohorts.ClientInput`: id and seed)."""
  return [(client_ids[i], seeds.client_seed(0, round_num, i))
          for i in (4, 5, 0, 7)]


# The last process compiled by `run_one_round` and its `CompiledRound`: the
# in-process and Ray backends run the same compiled graphs, so a test that
# runs both compiles once (10-20 s saved).
_last_compiled = [None, None]
_compile_process = mapreduce.compile_process  # The unpatched compiler.


def _compile_once(process):
  if _last_compiled[0] is not process:
    _last_compiled[:] = [process, _compile_process(process)]
  return _last_compiled[1]


def run_one_round(name, process, weights, cohort, state=None, **kwargs):
  # Children this process had before (e.g. multiprocessing's resource
  # tracker, started by an earlier test in the same process) are not the
  # backend's.
  before = process_guard.descendants(os.getpid())
  with unittest.mock.patch.object(mapreduce, "compile_process",
                                  _compile_once), \
      factory.open_backend(name, process, len(cohort), **kwargs) as backend:
    initial = backend.initialize(weights)
    backend.set_state(initial if state is None else state)
    metrics = backend.run_round(cohort)
    new_state = backend.get_state()
    model_weights = backend.get_model_weights()
    processes = {pid: start for pid, start in
                 process_guard.descendants(os.getpid()).items()
                 if before.get(pid) != start}
    if name == constants.BACKEND_INPROCESS:
      # No listening socket while the in-process backend runs.
      assert not listening_inodes() & own_socket_inodes()
  # Whatever the backend started (TFF worker, Ray's processes) is stopped.
  deadline = time.monotonic() + 30
  while alive(processes) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not alive(processes), f"{name} left processes {alive(processes)}"
  return dict(initial=initial, metrics=metrics, state=new_state,
              model_weights=model_weights)


def assert_close(got, want, what):
  got_flat, want_flat = mapreduce.to_flat(got), mapreduce.to_flat(want)
  assert len(got_flat) == len(want_flat), what
  for i, (g, w) in enumerate(zip(got_flat, want_flat)):
    if w.dtype.kind in "biuf":
      np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL,
                                 err_msg=f"{what}, leaf {i}")
    else:  # Strings (a DP query's state holds some).
      np.testing.assert_array_equal(g, w, err_msg=f"{what}, leaf {i}")
