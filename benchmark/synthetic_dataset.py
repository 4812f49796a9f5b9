"""Command: writes a FLAIR-like synthetic dataset directory.

  python -m benchmark.synthetic_dataset --dataset_dir DIR --num_users N \
      --seed S [--max_images_per_user M]

Writes DIR in the layout of a downloaded FLAIR dataset:
labels_and_metadata.json, label_relationship.txt,
small_images/<image_id>.jpg and a README.txt saying that the data is
synthetic. The same arguments and seed give the same bytes.
The generator and what its data follows: `benchmark.prepare.synthetic`.
"""

from absl import flags
from absl import logging

from benchmark.cli import commands
from benchmark.prepare import synthetic


def _define_flags() -> None:
  """Defines this command's flags (called by `run`, not at import, so that
  importing this module adds no global flags)."""
  flags.DEFINE_string("dataset_dir", None, "Output dataset directory.")
  flags.DEFINE_integer("num_users", 100, "Number of users (>= 3).")
  flags.DEFINE_integer("seed", 0, "Random seed (same seed, same files).")
  flags.DEFINE_integer("max_images_per_user", None,
                       "Optional cap on the images of one user.")
  flags.mark_flag_as_required("dataset_dir")


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Generates the dataset with the flags' settings and logs a summary."""
  del argv  # exit_on_input_error refused positional arguments.
  flag_values = flags.FLAGS
  summary = synthetic.generate(flag_values.dataset_dir, flag_values.num_users,
                               flag_values.seed,
                               flag_values.max_images_per_user,
                               show_progress=True)
  logging.info("wrote %d images of %d users to %s (users per partition %s, "
               "images per partition %s)", summary["num_images"],
               summary["num_users"], summary["dataset_dir"],
               summary["partition_users"], summary["partition_images"])


# Console-script entry point (`flair-synthetic`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
