"""Tests of the command-line layer (benchmark/cli/trainers.py, cli/flags.py
and each command's `_define_flags`), in process, except the race of two
commands started at once into one run directory."""

import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
import pytest

from benchmark.cli import commands
from benchmark.cli import trainers
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import locks
from benchmark.prepare import manifest
from benchmark.training import config as config_lib
from benchmark.training import run_dir
import flag_harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# Tiny settings of both trainers: nothing here trains, except the race.
_TINY = ("--image_height=32", "--image_width=32", "--model_layout=tiny",
         "--eval_batch_size=8")
# A bound on the race: two commands importing TensorFlow on a busy machine.
_RACE_TIMEOUT_S = 600

_COMMANDS = ("benchmark.central_main", "benchmark.federated_main",
             "benchmark.demo", "benchmark.explore",
             "benchmark.synthetic_dataset", "benchmark.report",
             "download_dataset", "prepare_tfrecords")
_SHARED = ("tfrecords_dir", "eval_batch_size", "restore_model_path",
           "save_model_dir", "skip_bad_records", "overwrite", "image_height",
           "image_width", "use_fine_grained_labels", "binary_label")


def test_all_commands_import_in_one_process_and_define_no_flag_at_import():
  modules = [importlib.import_module(name) for name in _COMMANDS]
  # Each defines its flags only when asked, so none is in absl's global
  # flags (importing two that define --tfrecords_dir would have raised
  # DuplicateFlagError).
  for name in ("tfrecords_dir", "dataset_dir", "learning_rate",
               "client_learning_rate", "num_workers", "results_dir"):
    assert name not in flags.FLAGS, name
  for module in modules:
    assert callable(module._define_flags), module.__name__


def test_the_trainers_share_one_definition_of_their_common_flags():
  central_flags, federated_flags = flags.FlagValues(), flags.FlagValues()
  importlib.import_module("benchmark.central_main")._define_flags(
      central_flags)
  importlib.import_module("benchmark.federated_main")._define_flags(
      federated_flags)
  for name in _SHARED:
    a, b = central_flags[name], federated_flags[name]
    assert (a.default, a.flag_type()) == (b.default, b.flag_type()), name
    if name not in ("restore_model_path", "save_model_dir"):
      assert a.help == b.help, name
  # The two that name the trainer differ only where they say so.
  assert "runs/central-" in central_flags["save_model_dir"].help
  assert "runs/federated-" in federated_flags["save_model_dir"].help
  assert "checkpoints/" in federated_flags["save_model_dir"].help
  # ml-flair's defaults.
  assert central_flags["image_height"].default == 224
  assert central_flags["eval_batch_size"].default == 512
  assert central_flags["learning_rate"].default == 1e-4
  assert federated_flags["clients_per_round"].default == 200
  assert federated_flags["total_rounds"].default == 5000


@pytest.mark.parametrize("module_name", ["benchmark.central_main",
                                         "benchmark.federated_main"])
def test_tfrecords_dir_is_required(module_name):
  with pytest.raises(flags.IllegalFlagValueError, match="tfrecords_dir"):
    flag_harness.parse(module_name)


def test_central_flags_become_a_central_config(tmp_path):
  from benchmark import central_main  # pylint: disable=import-outside-toplevel
  flag_values = flag_harness.parse(
      "benchmark.central_main", "--tfrecords_dir=/data/t",
      f"--save_model_dir={tmp_path}", "--image_height=32", "--num_epochs=3",
      "--learning_rate=0.5", "--binary_label=food", "--skip_bad_records")
  config = central_main.config_from_flags(flag_values)
  assert isinstance(config, config_lib.CentralConfig)
  assert (config.data.tfrecords_dir,
          config.output.save_model_dir) == ("/data/t", str(tmp_path))
  assert (config.model.image_height, config.model.image_width) == (32, 224)
  assert (config.training.num_epochs,
          config.training.learning_rate) == (3, 0.5)
  assert config.data.binary_label == "food"


def test_federated_flags_become_a_federated_config(tmp_path):
  from benchmark import federated_main  # pylint: disable=import-outside-toplevel
  flag_values = flag_harness.parse(
      "benchmark.federated_main", "--tfrecords_dir=/data/t",
      f"--save_model_dir={tmp_path}", "--clients_per_round=7",
      "--epsilon=2", "--server_optimizer=sgdm", "--image_width=48")
  config = federated_main.config_from_flags(flag_values)
  assert isinstance(config, config_lib.FederatedConfig)
  assert config.cohort.clients_per_round == 7
  assert config.dp.epsilon == 2.0
  assert config.server.server_optimizer == "sgdm"
  assert (config.model.image_height, config.model.image_width) == (224, 48)
  assert config.run.total_rounds == 5000


def test_unset_save_model_dir_becomes_a_new_run_dir(tmp_path, monkeypatch):
  from benchmark import central_main  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  config = central_main.config_from_flags(
      flag_harness.parse("benchmark.central_main", "--tfrecords_dir=/data/t"))
  parent, name = os.path.split(config.output.save_model_dir)
  assert os.path.basename(parent) == "runs"
  assert name.startswith("central-")


def test_a_bad_value_is_refused_naming_the_flag(tmp_path):
  from benchmark import federated_main  # pylint: disable=import-outside-toplevel
  flag_values = flag_harness.parse(
      "benchmark.federated_main", "--tfrecords_dir=/t",
      f"--save_model_dir={tmp_path}", "--eval_batch_size=0")
  with pytest.raises(errors.FlairInputError, match="--eval_batch_size"):
    federated_main.config_from_flags(flag_values)


def test_positional_arguments_are_refused():
  commands.reject_positional_args(["prog"])
  with pytest.raises(errors.FlairInputError,
                     match="unexpected positional arguments: extra"):
    commands.reject_positional_args(["prog", "extra"])


# --- What a trainer prints at the end -----------------------------------------


def _final(base, **extra):
  names = ("loss", "macro_averaged_precision", "micro_averaged_precision",
           "macro_f1", "micro_f1", "macro_precision")
  metrics = {n: base + 0.01 * i for i, n in enumerate(names)}
  return {"val": dict(metrics), "test": {k: v + 0.1 for k, v in
                                         metrics.items()}, **extra}


def test_finish_run_prints_a_short_table_not_the_json(tmp_path, capsys):
  final = _final(0.5, best_round=7, rounds_completed=9,
                 privacy={"guarantee": "(8, 0.0371)-DP at the user level"})
  assert trainers.finish_run(str(tmp_path), final, []) is final
  printed = capsys.readouterr().out.splitlines()
  assert printed == [
      "Final metrics (best weights by val loss, round 7):",
      "        macro AP  micro AP  macro F1  micro F1  loss",
      "  val   0.5100    0.5200    0.5300    0.5400    0.5000",
      "  test  0.6100    0.6200    0.6300    0.6400    0.6000",
      "Privacy: (8, 0.0371)-DP at the user level",
      f"All metrics: {tmp_path / 'final_metrics.json'}"]
  # Outside a command (no console set up): no log file is made.
  assert os.listdir(tmp_path) == []


def test_finish_run_names_the_skipped_records(tmp_path, capsys):
  from benchmark.data import triage  # pylint: disable=import-outside-toplevel
  bad = [triage.FileCheck("/data/train/u.tfrecords", 3, (1,), False,
                          "record 1 is bad")]
  final = trainers.finish_run(str(tmp_path), _final(0.2), bad)
  assert final["skipped_records"]["count"] == 1
  assert ("Skipped bad records: 1 (listed in final_metrics.json)"
          in capsys.readouterr().out.splitlines())


# --- start_run: what is refused before the run directory is claimed ---------


@pytest.fixture
def released():
  """Releases the run directory lock that `start_run` leaves held."""
  yield
  trainers.release_run_lock()


def _start_run(tfrecords_dir, save_dir, *extra,
               command="benchmark.central_main"):
  """`start_run` of `command` (central_main by default) on tiny settings."""
  module = importlib.import_module(command)
  flag_values = flag_harness.parse(
      command, f"--tfrecords_dir={tfrecords_dir}",
      f"--save_model_dir={save_dir}", *_TINY, *extra)
  trainer = command.rsplit(".", 1)[1].replace("_main", "")
  return trainers.start_run(module.config_from_flags(flag_values), trainer,
                            flag_values)


def _copy(prepared_sample_dir, tmp_path):
  copy = str(tmp_path / "tfrecords")
  shutil.copytree(prepared_sample_dir, copy)
  return copy


def test_start_run_holds_the_run_directory_lock(prepared_sample_dir,
                                                tmp_path, released):
  del released
  save_dir = str(tmp_path / "run")
  _start_run(prepared_sample_dir, save_dir)
  lock_path = os.path.join(save_dir, locks.LOCK_FILE)
  with open(lock_path, encoding="utf-8") as f:
    assert json.load(f)["pid"] == os.getpid()
  with pytest.raises(locks.DirectoryLockedError):
    locks.DirectoryLock(save_dir, "--save_model_dir").acquire()
  trainers.release_run_lock()
  assert not os.path.exists(lock_path)
  # The next run in this process (here the same one, resumed) takes it.
  _start_run(prepared_sample_dir, save_dir)
  assert os.path.exists(lock_path)


def test_a_run_directory_in_use_is_refused_before_it_is_claimed(
    prepared_sample_dir, tmp_path, released):
  del released
  save_dir = tmp_path / "run"
  save_dir.mkdir()
  with locks.DirectoryLock(str(save_dir), "--save_model_dir"):
    with pytest.raises(locks.DirectoryLockedError) as info:
      _start_run(prepared_sample_dir, save_dir)
    assert str(info.value).startswith(
        f"--save_model_dir {save_dir} is in use by process {os.getpid()} (")
    assert os.listdir(save_dir) == [locks.LOCK_FILE]  # No run.json.


def test_a_label_index_changed_after_prepare_is_refused(prepared_sample_dir,
                                                        tmp_path):
  copy = _copy(prepared_sample_dir, tmp_path)
  path = os.path.join(copy, constants.LABEL_INDEX_FILE)
  with open(path, encoding="utf-8") as f:
    index = json.load(f)
  coarse = index[constants.LABELS_KEY]
  coarse["animal"], coarse["structure"] = coarse["structure"], coarse["animal"]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(index, f)
  save_dir = tmp_path / "run"
  with pytest.raises(errors.FlairInputError) as info:
    _start_run(copy, save_dir, "--binary_label=animal")
  message = str(info.value)
  assert message.startswith(f"{path} is not the label index that "), message
  assert manifest.MANIFEST_FILE in message and "\n" not in message
  assert "rerun prepare_tfrecords.py" in message
  assert not save_dir.exists()


def test_a_directory_without_a_manifest_is_warned_about_once(
    prepared_sample_dir, tmp_path, caplog, released):
  del released
  copy = _copy(prepared_sample_dir, tmp_path)
  os.remove(os.path.join(copy, manifest.MANIFEST_FILE))
  caplog.set_level(logging.WARNING)
  _start_run(copy, tmp_path / "run")
  warnings = [r.getMessage() for r in caplog.records
              if manifest.MANIFEST_FILE in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "prepared before manifests existed" in warnings[0]


def test_an_empty_partition_is_refused_before_the_run_directory_is_claimed(
    prepared_sample_dir, tmp_path):
  copy = _copy(prepared_sample_dir, tmp_path)
  val = os.path.join(copy, constants.VAL)
  for name in os.listdir(val):
    os.remove(os.path.join(val, name))
  save_dir = tmp_path / "run"
  with pytest.raises(errors.FlairInputError, match="holds no"):
    _start_run(copy, save_dir)
  assert not save_dir.exists()


def test_dp_that_cannot_work_is_refused_before_the_run_directory_is_claimed(
    prepared_sample_dir, tmp_path):
  """Adaptive clipping with a cohort of 2: the noised clipped count needs a
  larger cohort; refused (naming the flags) before run.json is written."""
  save_dir = tmp_path / "run"
  with pytest.raises(errors.FlairInputError, match="--clients_per_round"):
    _start_run(prepared_sample_dir, save_dir, "--epsilon=2",
               "--clients_per_round=2", "--target_unclipped_quantile=0.5",
               "--total_rounds=2", command="benchmark.federated_main")
  assert not save_dir.exists()


def test_a_partition_left_empty_by_skipped_records_is_refused_first(
    prepared_sample_dir, tmp_path):
  """With --skip_bad_records, a partition whose every user file is bad
  would be empty: refused before run.json, flags.json and the mirror."""
  copy = _copy(prepared_sample_dir, tmp_path)
  val = os.path.join(copy, constants.VAL)
  for name in os.listdir(val):
    with open(os.path.join(val, name), "r+b") as f:
      f.truncate(10)  # Not even one record.
  save_dir = tmp_path / "run"
  with pytest.raises(errors.FlairInputError) as info:
    _start_run(copy, save_dir, "--skip_bad_records")
  assert str(info.value).startswith(
      f"partition 'val' of --tfrecords_dir {copy!r} has no user left once "
      "its bad records are skipped"), str(info.value)
  assert not save_dir.exists()


def _lines(path):
  """The lines of a text file; [] while it does not exist."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except FileNotFoundError:
    return []


def _wait_for_one(processes, timeout_s):
  """The first of `processes` to exit within `timeout_s`, or None."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    for process in processes:
      if process.poll() is not None:
        return process
    time.sleep(0.2)
  return None


@pytest.mark.slow
def test_two_runs_started_at_once_into_one_directory(prepared_sample_dir,
                                                     tmp_path):
  """Two central_main commands started together into one --save_model_dir:
  whichever locks the directory first runs on, the other exits 1 with one
  line naming it, before it writes anything (no "resuming", no round 0
  twice). The winner, stopped with SIGTERM, leaves no lock held."""
  save_dir = tmp_path / "twin"
  argv = [sys.executable, "-m", "benchmark.central_main",
          f"--tfrecords_dir={prepared_sample_dir}",
          f"--save_model_dir={save_dir}", *_TINY, "--train_batch_size=8",
          "--num_epochs=100000"]
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  logs = [open(tmp_path / f"run{i}.err", "w+", encoding="utf-8")
          for i in range(2)]
  processes = [subprocess.Popen(argv, cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
               for log in logs]
  try:
    loser = _wait_for_one(processes, _RACE_TIMEOUT_S)
    assert loser is not None, "neither run was refused"
    [winner] = [p for p in processes if p is not loser]
    stderr = logs[processes.index(loser)]
    stderr.seek(0)
    text = stderr.read()
    assert loser.returncode == 1, text
    errors_shown = [line for line in text.splitlines()
                    if line.startswith("error:")]
    assert errors_shown == [
        line for line in errors_shown if line.startswith(
            f"error: --save_model_dir {save_dir} is in use by process "
            f"{winner.pid} (")], text
    assert len(errors_shown) == 1 and "Traceback" not in text, text
    assert "resuming" not in text
    metrics_csv = save_dir / constants.METRICS_CSV_FILE
    deadline = time.monotonic() + _RACE_TIMEOUT_S
    while (winner.poll() is None and time.monotonic() < deadline
           and len(_lines(metrics_csv)) < 3):  # Two epochs, one header.
      time.sleep(0.2)
    assert winner.poll() is None, "the winner stopped early"
    winner.send_signal(signal.SIGTERM)
    assert winner.wait(timeout=_RACE_TIMEOUT_S) == 143
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
    for log in logs:
      log.close()
  epochs = [line.split(",")[0] for line in _lines(metrics_csv)[1:]]
  assert len(epochs) >= 2
  assert epochs == [str(e) for e in range(len(epochs))]  # None twice.
  # The lock file may stay (the process ended without removing it), but
  # unlocked, and it is no run output.
  assert run_dir.run_outputs_in(str(save_dir)) == sorted(
      n for n in os.listdir(save_dir) if n != locks.LOCK_FILE)
  locks.DirectoryLock(str(save_dir), "--save_model_dir").acquire().release()
