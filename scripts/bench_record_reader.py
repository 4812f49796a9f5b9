"""Milliseconds to read one small user file record by record: TF's record
reader (what `data.triage` checks every user file with) against one
`tf.data.TFRecordDataset` per file (the replacement TF's deprecation notice
names).

    python scripts/bench_record_reader.py [--files 200] [--records 8]

Writes `--files` user files of `--records` records of 20 KB (FLAIR's users
hold 8 images at the median, small JPEGs of about 15-25 KB) in a temporary
directory, reads them all once to warm the page cache, then reads them with
each reader in turn, `--repeats` times, and prints the median milliseconds
per file.
"""

import argparse
import inspect
import os
import statistics
import tempfile
import time

import tensorflow as tf

_READ_RECORDS = inspect.unwrap(tf.compat.v1.io.tf_record_iterator)


def _record_reader(paths) -> int:
  return sum(len(r) for p in paths for r in _READ_RECORDS(p))


def _dataset_per_file(paths) -> int:
  return sum(len(r) for p in paths
             for r in tf.data.TFRecordDataset(p).as_numpy_iterator())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--files", type=int, default=200)
  parser.add_argument("--records", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    paths = [os.path.join(tmp, f"user{i}.tfrecords")
             for i in range(args.files)]
    for path in paths:
      with tf.io.TFRecordWriter(path) as writer:
        for _ in range(args.records):
          writer.write(os.urandom(20000))
    times = {_record_reader: [], _dataset_per_file: []}
    assert _record_reader(paths) == _dataset_per_file(paths)  # Warm-up.
    for _ in range(args.repeats):
      for read in times:
        start = time.perf_counter()
        read(paths)
        times[read].append((time.perf_counter() - start) / len(paths) * 1e3)
    for read, ms in times.items():
      print(f"{read.__name__}: {statistics.median(ms):.3f} ms per file")


if __name__ == "__main__":
  main()
