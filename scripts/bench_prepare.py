"""Throughput of prepare against a plain copy of the same JPEGs.

  python scripts/bench_prepare.py [--num_images 5000] [--num_workers N]

Generates a FLAIR-like dataset of at least `--num_images` images in a
temporary directory (benchmark.prepare.synthetic), then times, in one run:

* copy: `shutil.copyfile` of every JPEG into a fresh directory (the floor:
  reading and writing the same bytes, nothing else);
* prepare, 1 worker, in this process with TensorFlow already imported
  (steady-state work: checks, Example encoding, TFRecord writing);
* prepare, 1 worker, command line (`python prepare_tfrecords.py`) end to end,
  with Python and TensorFlow start-up;
* prepare, all workers (default `--num_workers`: all cores), command line end
  to end (each worker process imports TensorFlow once).

It prints images/s for each and the ratio to the copy. The page cache is warm
for every measurement (the files were just written). Not a test.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmark.core import constants
from benchmark.prepare import pool
from benchmark.prepare import synthetic
from benchmark.prepare import tfrecords

# pylint: enable=g-import-not-at-top,wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer("num_images", 5000,
                                   "Minimum number of images to generate.",
                                   lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Workers of the parallel run; default all cores.",
    lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Directory for the data; default a temporary one, "
    "removed at the end.")


def _num_users_for(num_images: int, seed: int) -> int:
  """The fewest users (by doubling, then bisection) giving >= num_images."""
  def count(users):
    return len(synthetic.make_metadata(users, seed))
  high = 3
  while count(high) < num_images:
    high *= 2
  low = high // 2
  while low + 1 < high:
    middle = (low + high) // 2
    if count(middle) >= num_images:
      high = middle
    else:
      low = middle
  return high


def _timed(function) -> float:
  start = time.perf_counter()
  function()
  return time.perf_counter() - start


def _cli(dataset_dir: str, tfrecords_dir: str, num_workers: int) -> None:
  subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "prepare_tfrecords.py"),
       "--dataset_dir", dataset_dir, "--tfrecords_dir", tfrecords_dir,
       "--num_workers", str(num_workers)],
      check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv):
  del argv
  num_workers = _NUM_WORKERS.value or pool.default_num_workers()
  work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="bench_prepare_")
  try:
    dataset_dir = os.path.join(work_dir, "dataset")
    num_users = _num_users_for(_NUM_IMAGES.value, _SEED.value)
    generation = time.perf_counter()
    summary = synthetic.generate(dataset_dir, num_users, _SEED.value)
    generation = time.perf_counter() - generation
    num_images = summary["num_images"]
    image_dir = os.path.join(dataset_dir, constants.SMALL_IMAGES_DIR)
    names = sorted(os.listdir(image_dir))
    megabytes = sum(os.path.getsize(os.path.join(image_dir, n))
                    for n in names) / 1e6
    print(f"dataset: {num_images} images ({megabytes:.1f} MB of JPEG) of "
          f"{num_users} users, generated in {generation:.1f} s "
          f"({num_images / generation:.0f} images/s)")

    copy_dir = os.path.join(work_dir, "copy")
    os.makedirs(copy_dir)

    def copy():
      for name in names:
        shutil.copyfile(os.path.join(image_dir, name),
                        os.path.join(copy_dir, name))

    rows = [
        ("plain copy (shutil.copyfile)", _timed(copy)),
        ("prepare, 1 worker, in-process (TF imported)", _timed(
            lambda: tfrecords.prepare(
                dataset_dir, os.path.join(work_dir, "in_process"),
                num_workers=1, show_progress=False))),
        ("prepare, 1 worker, command line", _timed(
            lambda: _cli(dataset_dir, os.path.join(work_dir, "cli_1"), 1))),
        (f"prepare, {num_workers} workers, command line", _timed(
            lambda: _cli(dataset_dir, os.path.join(work_dir, "cli_n"),
                         num_workers))),
    ]
    copy_rate = num_images / rows[0][1]
    print(f"cores available: {pool.default_num_workers()}, "
          f"load average: {os.getloadavg()[0]:.1f}")
    print(f"{'what':48s} {'seconds':>8s} {'images/s':>9s} {'vs copy':>8s}")
    for what, seconds in rows:
      rate = num_images / seconds
      print(f"{what:48s} {seconds:8.2f} {rate:9.0f} {rate / copy_rate:8.3f}")
    print(f"{num_workers} workers vs 1 worker (command line): "
          f"{rows[2][1] / rows[3][1]:.2f}x")
  finally:
    if _WORK_DIR.value is None:
      shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
