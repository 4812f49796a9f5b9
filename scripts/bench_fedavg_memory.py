"""Peak memory of one FedAvg round against the cohort size, per backend.

    python scripts/bench_fedavg_memory.py [--tfrecords_dir T] \
        [--num_users 51414] [--cohorts 10,50,200] \
        [--backends inprocess,ray,tff_worker] [--max_rss_gb 12] \
        [--num_workers N]

Each (backend, cohort) runs in a child process that builds the trainer's
FedAvg process (ResNet-18 GroupNorm, 17 coarse labels, 32x32 crops, 1 client
epoch, at most 8 images per client, batch 8), opens the backend and runs two
rounds of `cohort` clients sampled from the training users. This script
samples the memory of the child's whole process tree (the TFF worker, Ray's
processes and actors included) every 0.2 s and prints the peak of its summed
RSS and of its summed PSS (RSS counts pages shared between the processes,
such as TensorFlow's libraries, once per process; PSS splits them, so it is
what the tree takes from the machine), each beside the ratio to the
smallest cohort's peak, the PSS of each kind of process at the PSS peak
and the RSS of each at the RSS peak. `--num_workers` is the backends'
(`ray`: actors). A tree that passes
`--max_rss_gb` is stopped and reported as over it (TFF's worker keeps every
client's update until the round's aggregation, so its memory grows with the
cohort).

Without `--tfrecords_dir` a FLAIR-sized population (`--num_users`, FLAIR has
51,414 users; at most `--max_images_per_user` images each) is generated and
prepared in a temporary directory first.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

# TensorFlow is imported before absl runs main: a Keras functional model
# built in a process that first imported TensorFlow inside main failed to
# build ("'SymbolicTensor' object has no attribute 'node'").
import tensorflow as tf  # pylint: disable=unused-import

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmark.backends import process_guard  # pylint: disable=g-import-not-at-top,wrong-import-position

_TFRECORDS_DIR = flags.DEFINE_string(
    "tfrecords_dir", None,
    "Prepared TFRecords; default: a generated population in a temporary "
    "directory.")
_NUM_USERS = flags.DEFINE_integer(
    "num_users", 51414, "Users of the generated population.")
_MAX_IMAGES_PER_USER = flags.DEFINE_integer(
    "max_images_per_user", 8,
    "Cap on each generated user's images (clients train on at most 8).")
_COHORTS = flags.DEFINE_list("cohorts", "10,50,200", "Clients per round.")
_BACKENDS = flags.DEFINE_list(
    "backends", "inprocess,ray,tff_worker", "Backends to measure.")
_MAX_RSS_GB = flags.DEFINE_float(
    "max_rss_gb", 12.0, "Stop a run whose process tree passes this RSS.")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "The backends' --num_workers (default theirs).")
_CHILD = flags.DEFINE_string(
    "child", None, "Internal: run one measurement, 'backend:cohort'.")


def _process_memory(pid: int) -> tuple[int, int]:
  """(RSS, PSS) of one process in bytes; (0, 0) if it is gone.

  RSS counts every resident page the process maps, so pages shared between
  processes (TensorFlow's libraries, Ray's object store) count once per
  process; PSS (Linux's proportional set size, /proc/PID/smaps_rollup)
  divides each shared page between the processes that map it, so PSS sums
  to what a process tree takes from the machine.
  """
  values = {}
  try:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
          values[key] = int(rest.split()[0]) * 1024
  except OSError:
    pass
  return values.get("Rss", 0), values.get("Pss", 0)


def _process_name(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return "?"


def _tree_memory(pid: int) -> tuple[int, int, list[tuple[str, int, int]]]:
  """Sums of RSS and PSS over `pid` and its descendants, and each
  process's (name, PSS, RSS), in bytes."""
  rss_total = pss_total = 0
  members = []
  for member in [pid] + list(process_guard.descendants(pid)):
    rss, pss = _process_memory(member)
    rss_total += rss
    pss_total += pss
    members.append((_process_name(member), pss, rss))
  return rss_total, pss_total, members


def _child(tfrecords_dir: str, spec: str) -> None:
  """One measurement, in its own process: two rounds; prints JSON."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from benchmark.backends import factory
  from benchmark.core import constants
  from benchmark.data import label_sets
  from benchmark.data import pipeline
  from benchmark.training import cohorts
  from benchmark.training import config as config_lib
  from benchmark.training import fedavg
  from benchmark.training import models
  # pylint: enable=g-import-not-at-top
  name, cohort = spec.split(":")
  cohort = int(cohort)
  config = config_lib.build(config_lib.FederatedConfig, dict(
      tfrecords_dir=tfrecords_dir, save_model_dir=tempfile.gettempdir(),
      image_height=32, image_width=32, client_epochs_per_round=1,
      max_elements_per_client=8, client_batch_size=8,
      clients_per_round=cohort, show_progress=False))
  label_spec = label_sets.load_label_spec(tfrecords_dir)
  train = pipeline.load_partition(tfrecords_dir, constants.TRAIN, label_spec)
  # The initial model is built before TFF traces the process (a Keras
  # functional model built after that tracing can fail to build).
  model = models.build_model(config.model, label_spec.num_outputs)
  weights = models.model_weights(model)
  process = fedavg.build_learning_process(
      config, label_spec, train,
      tff.learning.add_debug_measurements(tff.aggregators.MeanFactory()))
  ids = list(train.client_ids)
  rng = np.random.default_rng(0)
  times = []
  with factory.open_backend(name, process, cohort,
                             num_workers=_NUM_WORKERS.value) as backend:
    backend.set_state(backend.initialize(weights))
    for _ in range(2):
      chosen = [ids[i] for i in rng.choice(len(ids), cohort, replace=False)]
      start = time.monotonic()
      backend.run_round(cohorts.client_inputs(chosen, len(times) + 1))
      times.append(time.monotonic() - start)
  print("RESULT " + json.dumps({"round_s": times}), flush=True)


def _measure(tfrecords_dir: str, name: str, cohort: int) -> dict:
  command = [sys.executable, os.path.abspath(__file__),
             f"--tfrecords_dir={tfrecords_dir}", f"--child={name}:{cohort}"]
  if _NUM_WORKERS.value:
    command.append(f"--num_workers={_NUM_WORKERS.value}")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  limit = _MAX_RSS_GB.value * 2**30
  peak_rss = peak_pss = 0
  at_peak = []
  at_rss_peak = []
  over = False
  with tempfile.TemporaryFile("w+") as out:
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                               env=env, cwd=REPO_ROOT)
    try:
      while process.poll() is None:
        rss, pss, members = _tree_memory(process.pid)
        if rss > peak_rss:
          peak_rss, at_rss_peak = rss, members
        if pss > peak_pss:
          peak_pss, at_peak = pss, members
        if rss > limit:
          over = True
          for pid in process_guard.descendants(process.pid):
            os.kill(pid, 9)
          process.kill()
          break
        time.sleep(0.2)
    finally:
      if process.poll() is None:
        process.kill()
      process.wait()
    out.seek(0)
    lines = out.read().splitlines()
  result = {"peak_rss_gb": peak_rss / 2**30, "peak_pss_gb": peak_pss / 2**30,
            "over_limit": over, "at_peak": at_peak,
            "at_rss_peak": at_rss_peak}
  found = [l for l in lines if l.startswith("RESULT ")]
  if found:
    result.update(json.loads(found[-1][len("RESULT "):]))
  elif not over:
    result["error"] = (lines or ["(no output)"])[-1][:200]
  return result


def _breakdown(members: list[tuple[str, int, int]], column: int = 1) -> str:
  """'name GB' per process name (summed; PSS, or RSS with `column` 2),
  largest first, with the count of processes of that name if several."""
  by_name = {}
  counts = {}
  for member in members:
    name = member[0]
    by_name[name] = by_name.get(name, 0) + member[column]
    counts[name] = counts.get(name, 0) + 1
  return ", ".join(
      f"{name}{f' x{counts[name]}' if counts[name] > 1 else ''} "
      f"{size / 2**30:.2f}"
      for name, size in sorted(by_name.items(), key=lambda item: -item[1])
      if size >= 2**24)


def _run(tfrecords_dir: str) -> None:
  cohorts = [int(c) for c in _COHORTS.value]
  print(f"{'backend':12s} {'cohort':>6s} {'peak RSS GB':>12s} "
        f"{'x smallest':>10s} {'peak PSS GB':>12s} {'x smallest':>10s} "
        f"{'round s':>8s}  PSS GB by process at the PSS peak")
  for name in _BACKENDS.value:
    first_rss = first_pss = None
    for cohort in cohorts:
      result = _measure(tfrecords_dir, name, cohort)
      rss, pss = result["peak_rss_gb"], result["peak_pss_gb"]
      first_rss, first_pss = first_rss or rss, first_pss or pss
      shown = f"> {_MAX_RSS_GB.value:.1f}" if result["over_limit"] else (
          f"{rss:.2f}")
      round_s = result.get("round_s", [float("nan")])[-1]
      print(f"{name:12s} {cohort:6d} {shown:>12s} {rss / first_rss:10.2f} "
            f"{pss:12.2f} {pss / first_pss:10.2f} {round_s:8.1f}  "
            f"{_breakdown(result['at_peak'])}"
            + (f"  {result['error']}" if "error" in result else ""),
            flush=True)
      print(f"{'':12s} {'':6s} RSS GB by process at the RSS peak: "
            f"{_breakdown(result['at_rss_peak'], 2)}", flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CHILD.value:
    _child(_TFRECORDS_DIR.value, _CHILD.value)
    return
  if _TFRECORDS_DIR.value:
    _run(_TFRECORDS_DIR.value)
    return
  from benchmark.prepare import synthetic  # pylint: disable=g-import-not-at-top
  from benchmark.prepare import tfrecords  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as root:
    dataset_dir = os.path.join(root, "dataset")
    tfrecords_dir = os.path.join(root, "tfrecords")
    start = time.monotonic()
    synthetic.generate(
        dataset_dir, num_users=_NUM_USERS.value, seed=0,
        max_images_per_user=_MAX_IMAGES_PER_USER.value)
    tfrecords.prepare(dataset_dir, tfrecords_dir, show_progress=False)
    print(f"generated and prepared {_NUM_USERS.value} users in "
          f"{time.monotonic() - start:.0f} s", flush=True)
    _run(tfrecords_dir)


if __name__ == "__main__":
  app.run(main)
