"""The report command: a folder of runs turned into one results table and
one figure of validation curves.

    python -m benchmark.report RUN_DIR_OR_GLOB... [--output_dir D]
        [--sort_by COLUMN] [--nogroup_seeds]

Reads the run directories (`--save_model_dir` of `central_main` and
`federated_main`, finished or not, written by this version or an earlier
one; `analysis.runs`), a glob of them, or a folder whose sub-folders are
runs, and writes into `--output_dir`:

* `RESULTS_MARKDOWN` and `RESULTS_CSV`: one row per run, or per setting
  repeated with other seeds (mean ± std), with what it is and its final
  test and best validation metrics (`analysis.results_table`);
* `VAL_CURVES_FIGURE`: validation metrics against epochs and rounds
  (`analysis.run_figures`).

It prints the table, a note for each run that is unfinished or has files
missing and for each argument that names no run, and where the files are.
An argument that names no run is a note, not an error; no run at all is a
one-line error.
"""

import datetime
import os
from typing import Optional, Sequence

from absl import flags

from benchmark.analysis import active_figures
from benchmark.analysis import results_table
from benchmark.analysis import run_figures
from benchmark.analysis import runs as runs_lib
from benchmark.cli import commands
from benchmark.cli import console
from benchmark.core import errors
from benchmark.core import file_io

# The files of a report.
RESULTS_MARKDOWN = "results.md"
RESULTS_CSV = "results.csv"
VAL_CURVES_FIGURE = "val_curves.png"
ACTIVE_FIGURE = "active_learning.png"
# Parent of the default --output_dir.
DEFAULT_REPORTS_DIR = "reports"
_FLAG = "--output_dir"


def default_output_dir(now: Optional[datetime.datetime] = None) -> str:
  """`reports/report-<UTC time>`, e.g. `reports/report-20260131-142501`."""
  now = now or datetime.datetime.now(datetime.timezone.utc)
  return os.path.join(DEFAULT_REPORTS_DIR, f"report-{now:%Y%m%d-%H%M%S}")


def make_report(arguments: Sequence[str], output_dir: str,
                sort_by: Optional[str] = None,
                group_seeds: bool = True) -> str:
  """Writes the report of the runs `arguments` name into `output_dir`
  and returns what the command prints.

  Args:
    arguments: run directories, globs of them, or folders of runs
      (`runs.find_run_dirs`).
    output_dir: created if missing; its report files are replaced.
    sort_by: a column of `results_table.CSV_COLUMNS`, or None for the
      order of `arguments`.
    group_seeds: one row per setting repeated with other seeds.

  Returns:
    The text: the Markdown table, the notes, the files written.

  Raises:
    FlairInputError: no argument, no run among them, or an unknown
      `sort_by`.
    OutputWriteError: a file cannot be written (names it).
  """
  if not arguments:
    raise errors.FlairInputError(
        "name the runs to report: run directories, globs or folders of "
        "runs (e.g. python -m benchmark.report runs/*)")
  paths, notes = runs_lib.find_run_dirs(arguments)
  if not paths:
    raise errors.FlairInputError(
        f"no run directory among {' '.join(arguments)} ({'; '.join(notes)})")
  rows = results_table.make_rows([runs_lib.read_run(p) for p in paths],
                                 group_seeds=group_seeds)
  try:
    rows = results_table.sort_rows(rows, sort_by)
  except ValueError as e:
    raise errors.FlairInputError(f"--sort_by: {e}") from None
  for row in rows:
    notes += row.notes()
  markdown = results_table.to_markdown(rows)
  file_io.write_text_atomic(os.path.join(output_dir, RESULTS_MARKDOWN),
                            markdown + "\n", _FLAG)
  file_io.write_text_atomic(os.path.join(output_dir, RESULTS_CSV),
                            results_table.to_csv(rows), _FLAG)
  lines = [markdown, ""]
  lines += [f"note: {note}" for note in notes]
  figure = os.path.join(output_dir, VAL_CURVES_FIGURE)
  if run_figures.has_points(rows):
    run_figures.plot_val_curves(rows, figure)
    lines.append(f"Figure: {figure}")
  else:
    lines.append("Figure: none (no run has a validation point yet)")
  active = os.path.join(output_dir, ACTIVE_FIGURE)
  if active_figures.plot_active_learning(paths, active):
    lines.append(f"Figure: {active} (test macro AP against labelled images)")
  lines.append(f"Table: {os.path.join(output_dir, RESULTS_MARKDOWN)} "
               f"(and {RESULTS_CSV})")
  return "\n".join(lines)


@commands.exit_on_input_error(positional_args=True)
def main(argv: list[str]) -> None:
  """Reports on the runs named by the positional arguments."""
  values = flags.FLAGS
  output_dir = os.path.abspath(values.output_dir or default_output_dir())
  console.log_into(output_dir)
  print(make_report(argv[1:], output_dir, values.sort_by,
                    values.group_seeds), flush=True)


def _define_flags() -> None:
  """Defines the command's flags (when it runs, not at import)."""
  flags.DEFINE_string(
      "output_dir", None,
      f"Where {RESULTS_MARKDOWN}, {RESULTS_CSV} and {VAL_CURVES_FIGURE} go "
      "(created if missing; earlier report files there are replaced). "
      f"Default: a new folder {DEFAULT_REPORTS_DIR}/report-<UTC time>.")
  flags.DEFINE_string(
      "sort_by", None,
      "A column of the CSV to sort the rows by (e.g. test_macro_ap): "
      "metrics best first, other columns ascending. Default: the order of "
      "the arguments.")
  flags.DEFINE_boolean(
      "group_seeds", True,
      "One row per setting repeated with other seeds (--seed, "
      "--client_datasets_random_seed, --iid_seed), with mean ± standard "
      "deviation; --nogroup_seeds gives one row per run.")


# Console-script entry point (`flair-report`); the command names its log.
run = commands.entry_point(_define_flags, main, log_dir_flags=())


if __name__ == "__main__":
  run()
