"""Times how FLAIR-IID clients read their records (benchmark.data.iid).

An IID client reads each dealt record k of a user file as
`TFRecordDataset(file).skip(k).take(1)`, which reads the file up to k; a
non-IID client reads its own file in sequence. This writes one user file of
`--records` records of `--record_bytes` random bytes (FLAIR's small JPEGs
are about 15-25 KB) in a temporary directory and prints milliseconds per
record for a sequential read and for single-record reads at a few
positions (each repeated `--repeats` times, after one warm-up pass; the
file is in the page cache).

  python scripts/bench_iid_read.py [--records 512] [--record_bytes 20000]
"""

import argparse
import os
import tempfile
import time

import tensorflow as tf


def _ms_per_record(dataset: tf.data.Dataset) -> float:
  sum(1 for _ in dataset)  # Warm-up.
  start = time.perf_counter()
  count = sum(1 for _ in dataset)
  return (time.perf_counter() - start) / count * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", type=int, default=512)
  parser.add_argument("--record_bytes", type=int, default=20000)
  parser.add_argument("--repeats", type=int, default=200)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "user.tfrecords")
    with tf.io.TFRecordWriter(path) as writer:
      for _ in range(args.records):
        writer.write(os.urandom(args.record_bytes))
    sequential = tf.data.TFRecordDataset(path).repeat(
        max(1, args.repeats // args.records))
    print(f"sequential read: {_ms_per_record(sequential):.3f} ms per record")
    for position in (0, args.records // 4, args.records // 2,
                     args.records - 1):
      positions = tf.data.Dataset.from_tensor_slices(
          tf.fill([args.repeats], tf.constant(position, tf.int64)))
      single = positions.flat_map(
          lambda k: tf.data.TFRecordDataset(path).skip(k).take(1))
      print(f"record {position} alone (IID): "
            f"{_ms_per_record(single):.3f} ms per record")


if __name__ == "__main__":
  main()
