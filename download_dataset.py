"""Command: downloads FLAIR and unpacks it into a dataset directory.

  python download_dataset.py --dataset_dir ~/data/flair
  python download_dataset.py --dataset_dir D --data_url http://mirror/flair/

Fetches the label files and the 43 small-image archives (`--download_raw`:
also the 43 raw-image archives) from `--data_url` (docs/formats.md,
"Download layout"), unpacks them safely into `--dataset_dir` and verifies
that every image named in labels_and_metadata.json is there (missing ones
are listed in `<dataset_dir>/missing_images.txt`, exit status 1). Safe to
rerun: complete files are not requested again and partial ones resume, but
only when the server's file is provably the same (`If-Range`; otherwise it
is fetched again whole); after a successful run a rerun only verifies. One
download at a time: a second one into the same `--dataset_dir` is refused
with one line naming the running process. Progress bars show bytes
overall, bytes per file in flight and archives unpacked. Ctrl-C or SIGTERM
stops the run cleanly (exit 130 / 143); errors are one line (exit 1).

The pipeline, its retries and its safety rules: `benchmark.prepare.download`.
"""

import time

from absl import flags

from benchmark.cli import commands
from benchmark.prepare import download


def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this command's flags (called by `run`, not at import, so that
  this module can be imported beside the other commands)."""
  flags.DEFINE_string(
      "dataset_dir", None,
      "Directory to download FLAIR into (created if missing); ends up holding "
      "labels_and_metadata.json, label_relationship.txt and small_images/.",
      flag_values=flag_values)
  flags.DEFINE_bool(
      "download_raw", False,
      "Also download the raw full-size images into raw_images/ (43 more "
      "archives, about 1.2 TB unpacked).",
      flag_values=flag_values)
  flags.DEFINE_bool(
      "keep_archive_after_decompress", False,
      "Keep each .tar.gz archive in dataset_dir after unpacking it (by default "
      "it is deleted once unpacked).",
      flag_values=flag_values)
  flags.DEFINE_string(
      "data_url", download.DEFAULT_DATA_URL,
      "Base URL of the FLAIR files (labels/, images/); point it at a mirror or "
      "a local server.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_workers", 4, "Number of files downloaded in parallel.",
      lower_bound=1, upper_bound=download.MAX_WORKERS,
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_unpack_workers", None,
      "Number of archives unpacked in parallel; default min(4, CPU count).",
      lower_bound=1, upper_bound=download.MAX_WORKERS,
      flag_values=flag_values)
  flags.DEFINE_integer(
      "max_retries", 5,
      "Retries of a file after consecutive connection errors, truncated "
      "transfers or HTTP 5xx/408/429 replies.", lower_bound=0,
      flag_values=flag_values)
  flags.DEFINE_float(
      "retry_backoff_s", 1.0,
      "Seconds to wait before the first retry; doubled for each further retry "
      "(at most 60 s).", lower_bound=0.0,
      flag_values=flag_values)
  flags.DEFINE_float(
      "timeout_s", 60.0, "Socket timeout of one HTTP request, in seconds.",
      lower_bound=0.001,
      flag_values=flag_values)
  flags.DEFINE_bool("progress", True, "Show progress bars.",
                    flag_values=flag_values)
  flags.mark_flag_as_required("dataset_dir", flag_values=flag_values)


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Runs the download with the flags' settings and prints a summary."""
  del argv  # exit_on_input_error refused positional arguments.
  start = time.monotonic()
  values = flags.FLAGS
  summary = download.download(
      values.dataset_dir, data_url=values.data_url,
      download_raw=values.download_raw,
      keep_archives=values.keep_archive_after_decompress,
      num_workers=values.num_workers,
      num_unpack_workers=values.num_unpack_workers,
      max_retries=values.max_retries, retry_backoff_s=values.retry_backoff_s,
      timeout_s=values.timeout_s, show_progress=values.progress)
  print(f"FLAIR ready in {summary.dataset_dir}: "
        f"{summary.num_images_verified} images verified; "
        f"{len(summary.fetched)} file(s) fetched "
        f"({summary.bytes_downloaded / 2**20:.1f} MiB, "
        f"{len(summary.resumed)} resumed), {len(summary.unpacked)} archive(s) "
        f"unpacked, {len(summary.skipped)} already complete, "
        f"{time.monotonic() - start:.1f} s.")


# Console-script entry point (`flair-download`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
