"""Tests of the command-line layer (benchmark/cli/trainers.py, cli/flags.py
and each command's `_define_flags`), in process: no command is started."""

import importlib
import os

from absl import flags
import pytest

from benchmark.cli import commands
from benchmark.cli import trainers
from benchmark.core import errors
from benchmark.training import config as config_lib
import flag_harness

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
