"""The commands' console and log file (benchmark/cli/console.py and
benchmark/cli/stderr_filter.py): which lines and records go where, the
filter process on a real file descriptor 2, and a command's bad flag in
one line with TensorFlow imported."""

import logging
import os
import subprocess
import sys
import textwrap

from absl import flags
import pytest

from benchmark.cli import console
from benchmark.cli import stderr_filter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# Lines as TensorFlow 2.14 wrote them in `make demo` (2026-12-03).
CUDNN = ("2026-12-03 14:36:12.216364: E tensorflow/compiler/xla/"
         "stream_executor/cuda/cuda_dnn.cc:9342] Unable to register cuDNN "
         "factory: Attempting to register factory for plugin cuDNN when one "
         "has already been registered")
FETCH = ("2026-12-03 14:37:18.299526: E tensorflow/core/grappler/"
         "grappler_item_builder.cc:435] Failed to detect the fetch node(s), "
         "skipping this input")
CPU_GUARD = ("2026-12-03 14:40:02.437337: I tensorflow/core/platform/"
             "cpu_feature_guard.cc:182] This TensorFlow binary is optimized "
             "to use available CPU instructions in performance-critical "
             "operations.")
CPU_GUARD_2 = ("To enable the following instructions: AVX2 AVX512F FMA, in "
               "other operations, rebuild TensorFlow with the appropriate "
               "compiler flags.")
# A real error: what TensorFlow logs when an op fails.
OP_ERROR = ("2026-12-03 14:40:05.000001: W tensorflow/core/framework/"
            "op_kernel.cc:1839] OP_REQUIRES failed at whole_file_read_ops.cc"
            ":116 : NOT_FOUND: /data/x.jpg; No such file or directory")


def test_harmless_and_info_lines_go_to_the_log_real_errors_to_the_console():
  router = stderr_filter.Router()
  assert [router.route(l) for l in (CUDNN, FETCH, CPU_GUARD, CPU_GUARD_2)] == [
      stderr_filter.LOG] * 4
  console_lines = [
      OP_ERROR,
      # A known text from another source file, or with more text: shown.
      CUDNN.replace("cuda_dnn.cc", "other.cc"),
      CUDNN + " (and something else)",
      # absl's C++ prefix, an unknown error.
      "E1203 14:37:18.299526   1234 chttp2_transport.cc:1234] Connection "
      "refused",
      "Traceback (most recent call last):",
      "error: --eval_batch_size must be at least 1, got 0",
  ]
  assert [router.route(l) for l in console_lines] == [
      stderr_filter.CONSOLE] * len(console_lines)
  # The continuation line follows the message before it, not any line.
  assert stderr_filter.Router().route(CPU_GUARD_2) == stderr_filter.CONSOLE


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "benchmark.central_main", "--x=1"], True),
    (["python", "-u", "-mbenchmark.report", "runs"], True),
    (["python", "-W", "ignore", "/repo/prepare_tfrecords.py"], True),
    (["python", "-m", "prepare_tfrecords", "--tfrecords_dir=t"], True),
    (["/venv/bin/python", "/venv/bin/flair-federated"], True),
    (["python", "-m", "benchmark.backends.process_guard", "1"], False),
    (["python", "-m", "pytest", "tests"], False),
    (["python", "-c", "import benchmark"], False),
    (["python"], False),
])
def test_only_the_suites_commands_filter_their_stderr(argv, expected):
  assert stderr_filter.is_command(argv) is expected


def _run_python(code: str, cwd: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True,
      text=True, timeout=120, check=False)


_WRITES = f"""
    import os, sys
    from benchmark.cli import stderr_filter
    assert stderr_filter.start()
    def cpp(line):  # As C++ writes: one write() to file descriptor 2.
      os.write(2, (line + "\\n").encode())
    cpp({CUDNN!r})
    cpp({OP_ERROR!r})
    print("python's own stderr", file=sys.stderr)
"""


def test_the_filter_process_on_file_descriptor_2(tmp_path):
  log = tmp_path / "run" / "log.txt"
  result = _run_python(_WRITES + f"""
    stderr_filter.log_to({str(log)!r}, {str(tmp_path / "run")!r})
    cpp({FETCH!r})
    os.makedirs({str(tmp_path / "run")!r})  # Ready from now on.
    cpp({CPU_GUARD!r})
    cpp({CPU_GUARD_2!r})
  """, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert sorted(result.stderr.splitlines()) == sorted(
      [OP_ERROR, "python's own stderr"])
  # Every C++ line, in order, held until the directory was made.
  assert log.read_text().splitlines() == [CUDNN, OP_ERROR, FETCH, CPU_GUARD,
                                          CPU_GUARD_2]


def test_the_filter_shows_everything_when_verbose(tmp_path):
  result = _run_python(_WRITES + f"""
    stderr_filter.verbose()
    cpp({FETCH!r})
  """, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert sorted(result.stderr.splitlines()) == sorted(
      [CUDNN, OP_ERROR, FETCH, "python's own stderr"])


def test_a_log_never_ready_is_never_written(tmp_path):
  result = _run_python(_WRITES + f"""
    stderr_filter.log_to({str(tmp_path / "run" / "log.txt")!r},
                         {str(tmp_path / "run" / "run.json")!r})
  """, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert os.listdir(tmp_path) == []


def _record(pathname: str, level: int = logging.INFO) -> logging.LogRecord:
  return logging.LogRecord("absl", level, pathname, 1, "a message %d", (3,),
                           None)


def test_the_console_shows_the_suites_info_and_everyones_warnings():
  handler = console.ConsoleHandler()
  own = os.path.join(REPO_ROOT, "benchmark", "training", "federated.py")
  library = os.path.join(os.path.dirname(logging.__file__), "x.py")
  assert handler.filter(_record(own))
  assert handler.filter(_record(os.path.join(REPO_ROOT,
                                             "prepare_tfrecords.py")))
  assert not handler.filter(_record(library))
  assert handler.filter(_record(library, logging.WARNING))
  assert handler.format(_record(own)) == "a message 3"
  assert handler.format(_record(library, logging.WARNING)) == (
      "warning: a message 3")
  assert handler.format(_record(library, logging.ERROR)) == (
      "error: a message 3")


def test_the_log_file_holds_records_until_its_directory_is_ready(tmp_path):
  handler = console.LogFileHandler()
  try:
    handler.emit(_record("x.py"))  # Held: no file named yet.
    run = tmp_path / "run"
    handler.set_file(str(run / console.LOG_FILE), str(run / "run.json"))
    handler.emit(_record("y.py"))
    assert not run.exists()
    run.mkdir()
    (run / "run.json").write_text("{}")
    handler.emit(_record("z.py", logging.WARNING))
    lines = (run / console.LOG_FILE).read_text().splitlines()
  finally:
    handler.close()
  assert lines[0].startswith("==== ")  # Which command, when.
  assert [l.split("] ")[-1] for l in lines[1:]] == ["a message 3"] * 3
  assert [l.split(" ", 3)[2] for l in lines[1:]] != []
  assert [l[0] for l in lines[1:]] == ["I", "I", "W"]


def _parsed(**values):
  flag_values = flags.FlagValues()
  for name in values:
    flags.DEFINE_string(name, None, "", flag_values=flag_values)
  flag_values(["prog"] + [f"--{k}={v}" for k, v in values.items()
                          if v is not None])
  return flag_values


def test_logs_go_into_results_folders_and_beside_data(tmp_path):
  run, data = str(tmp_path / "run"), str(tmp_path / "tfrecords")
  assert console.log_place_from_flags(_parsed(
      save_model_dir=run, tfrecords_dir=data)) == (
          os.path.join(run, "log.txt"), os.path.join(run, "run.json"))
  assert console.log_place_from_flags(_parsed(
      output_dir=run, dataset_dir=data)) == (os.path.join(run, "log.txt"),
                                             run)
  # Prepared data and datasets keep their bytes: the log lies beside them.
  assert console.log_place_from_flags(_parsed(
      dataset_dir=str(tmp_path / "d"), tfrecords_dir=data + "/")) == (
          data + ".log", data)
  assert console.log_place_from_flags(_parsed(
      output_file=str(tmp_path / "f.hdf5"))) == (
          str(tmp_path / "f.hdf5.log"), str(tmp_path / "f.hdf5"))
  # A trainer without --save_model_dir names its run directory later.
  assert console.log_place_from_flags(_parsed(
      save_model_dir=None, tfrecords_dir=data)) == (None, None)


def test_a_bad_flag_is_one_line_with_tensorflow_imported(tmp_path):
  """The whole console path of a trainer: TensorFlow's C++ start-up lines
  are filtered, the error is one line, and nothing is written."""
  save_dir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "benchmark.federated_main",
       f"--tfrecords_dir={tmp_path / 'none'}", f"--save_model_dir={save_dir}",
       "--eval_batch_size=0"],
      cwd=REPO_ROOT, env={k: v for k, v in os.environ.items()
                          if k != "TF_CPP_MIN_LOG_LEVEL"},
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  [line] = result.stderr.splitlines()
  assert line.startswith("error: ") and "--eval_batch_size" in line
  assert result.stdout == ""
  assert not save_dir.exists()
