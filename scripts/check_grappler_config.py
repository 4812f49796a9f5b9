"""TFF's Grappler options against `backends.mapreduce.grappler_config`:
errors logged while compiling the FedAvg round, compile time, and the
results of one round.

    python scripts/check_grappler_config.py [--layout tiny|resnet18] [--dp]

Builds the deterministic FedAvg round of tests/round_harness.py (the real
sample prepared into --tfrecords_dir, 4 clients, one batch each, the
model's random crop and flip replaced by their inference behaviour) and
compiles it to MapReduceForm three times, each in a fresh process (Grappler
reports the function optimizer's failure only on a process's first
compile): with TFF's own options, with them again (TensorFlow's run-to-run
round-off), and with the suite's. For each it prints the compile time and
the ERROR lines TensorFlow's C++ wrote to fd 2 while compiling, runs one
round in process, and prints the largest difference of the server state,
metrics and model weights from the first round.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

# pylint: disable=g-import-not-at-top,wrong-import-position
import round_harness
from benchmark.backends import mapreduce
from benchmark.core import constants
from benchmark.training import dp
# pylint: enable=g-import-not-at-top,wrong-import-position


@contextlib.contextmanager
def _fd2_lines():
  """Collects what is written to file descriptor 2 inside the block."""
  lines = []
  with tempfile.TemporaryFile() as f:
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
      yield lines
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      f.seek(0)
      lines += f.read().decode("utf-8", "replace").splitlines()


def _one_round(args, config):
  """Compiles and runs one round; `config` None: TFF's own options."""
  with pytest.MonkeyPatch.context() as patch:
    round_harness.deterministic_augmentation(patch)
    if config is None:  # An empty config: TFF merges its own into it.
      patch.setattr(mapreduce, "grappler_config", tf.compat.v1.ConfigProto)
    aggregator = (dp.build_aggregator(0.0, round_harness.COHORT_SIZE, 0.1,
                                      0.5) if args.dp else None)
    process, weights, ids = round_harness.build(
        args.tfrecords_dir, aggregator, weighted=not args.dp,
        model_layout=args.layout)
    start = time.monotonic()
    with _fd2_lines() as lines:
      compiled = mapreduce.compile_process(process)
    seconds = time.monotonic() - start
    round_harness._last_compiled[:] = [process, compiled]  # pylint: disable=protected-access
    result = round_harness.run_one_round(
        constants.BACKEND_INPROCESS, process, weights,
        round_harness.cohort_of(ids))
  errors = [line for line in lines if ": E " in line]
  return seconds, errors, result


def _largest_difference(a, b) -> float:
  return max((float(np.max(np.abs(x.astype(np.float64) - y.astype(
      np.float64)))) for x, y in zip(a, b) if x.size), default=0.0)


def _compile_here(args) -> None:
  """The child: one compile and round; prints the summary, saves the
  round's numbers to --save."""
  seconds, errors, result = _one_round(
      args, None if args.config == "tff" else mapreduce.grappler_config)
  print(f"compiled in {seconds:.1f} s, {len(errors)} ERROR lines")
  for line in errors:
    print("   ", line[:160])
  flat = [x for part in ("state", "metrics", "model_weights")
          for x in mapreduce.to_flat(result[part]) if x.dtype.kind in "biuf"]
  np.savez(args.save, *flat)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tfrecords_dir", required=True,
                      help="the real sample, prepared (prepare_tfrecords.py)")
  parser.add_argument("--layout", default="tiny",
                      choices=("tiny", "resnet18"))
  parser.add_argument("--dp", action="store_true",
                      help="the DP aggregator (adaptive clipping)")
  parser.add_argument("--config", choices=("tff", "ours"),
                      help=argparse.SUPPRESS)  # In a child process.
  parser.add_argument("--save", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.config:
    _compile_here(args)
    return
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, config) in enumerate((
        ("TFF's options", "tff"), ("TFF's options again", "tff"),
        ("grappler_config()", "ours"))):
      save = os.path.join(tmp, f"{i}.npz")
      child = subprocess.run(
          [sys.executable, __file__, f"--tfrecords_dir={args.tfrecords_dir}",
           f"--layout={args.layout}", f"--config={config}", f"--save={save}"]
          + (["--dp"] if args.dp else []), capture_output=True, text=True,
          check=True)
      with np.load(save) as data:
        results.append([data[k] for k in data.files])
      print(f"{name}: {child.stdout.strip()}")
      print(f"  largest difference from the first: "
            f"{_largest_difference(results[-1], results[0]):.3g}")


if __name__ == "__main__":
  main()
