"""Tests of the trainers' configurations (benchmark/training/config.py) and
of the flags declared by them (benchmark/cli/flags.py): each setting is
declared once, checked on construction, and part of a run's identity only
where its declaration says."""

import dataclasses

from absl import flags
import pytest

from benchmark.cli import flags as flags_lib
from benchmark.core.errors import FlairInputError
from benchmark.training import config as config_lib

_WHOLE = (config_lib.FederatedConfig, config_lib.CentralConfig)
_HELP_VALUES = dict(trainer="t", outputs="o", restore_use="r", runs_dir="d")


def _flags(config_type):
  flag_values = flags.FlagValues()
  flags_lib.define_config_flags(config_type, flag_values, **_HELP_VALUES)
  return flag_values


@pytest.mark.parametrize("config_type", _WHOLE)
def test_every_setting_with_a_flag_is_the_flag_of_its_name_and_default(
    config_type):
  flag_values = _flags(config_type)
  settings = config_lib.declared_settings(config_type)
  names = [f.name for f in settings]
  assert len(names) == len(set(names)), "a setting is declared twice"
  for field in settings:
    if config_lib.declaration(field).flag:
      assert flag_values[field.name].default == field.default, field.name
      assert "{" not in flag_values[field.name].help, field.name
    else:
      assert field.name not in flag_values, field.name
  assert flag_values["tfrecords_dir"].required if hasattr(
      flag_values["tfrecords_dir"], "required") else True


def test_the_parts_both_trainers_have_are_the_same_declarations():
  federated = config_lib.parts(config_lib.FederatedConfig)
  central = config_lib.parts(config_lib.CentralConfig)
  for attribute in ("data", "model", "output"):
    assert federated[attribute] is central[attribute]


def test_build_takes_flag_names_and_refuses_unknown_ones():
  config = config_lib.build(config_lib.FederatedConfig, {
      "tfrecords_dir": "t", "save_model_dir": "s", "clients_per_round": 7,
      "epsilon": 2.0, "server_optimizer": "sgdm", "model_layout": "tiny"})
  assert config.cohort.clients_per_round == 7
  assert config.dp.enabled and config.server.server_optimizer == "sgdm"
  assert config.model.model_layout == "tiny"
  assert config.run.total_rounds == 5000  # ml-flair's default.
  with pytest.raises(TypeError, match="no setting clients_per_epoch"):
    config_lib.build(config_lib.FederatedConfig, {
        "tfrecords_dir": "t", "save_model_dir": "s", "clients_per_epoch": 1})
  assert config_lib.replace(config, total_rounds=3).run.total_rounds == 3


@pytest.mark.parametrize("name,value", [
    ("eval_batch_size", 0), ("image_height", 257), ("client_momentum", 1.0),
    ("target_unclipped_quantile", 1.0), ("epsilon", -1.0),
    ("backend", "spark"), ("model_layout", "resnet50"),
    ("simulated_clients_per_round", 0), ("client_learning_rate", 0.0),
    ("server_beta_2", -0.1), ("iid_seed", -1), ("precision", "float16")])
def test_a_bad_value_is_refused_naming_its_flag(name, value):
  with pytest.raises(FlairInputError, match=f"--{name}"):
    config_lib.build(config_lib.FederatedConfig, {
        "tfrecords_dir": "t", "save_model_dir": "s", name: value})


def test_ray_address_needs_the_ray_backend():
  with pytest.raises(FlairInputError, match="--ray_address"):
    config_lib.build(config_lib.FederatedConfig, {
        "tfrecords_dir": "t", "save_model_dir": "s", "ray_address": "h:1"})


def _identity(**values):
  return config_lib.identity_settings(config_lib.build(
      config_lib.FederatedConfig,
      dict(tfrecords_dir="t", save_model_dir="s", **values)))


def test_identity_holds_the_settings_that_change_results():
  plain = _identity()
  for name in ("client_learning_rate", "clients_per_round", "seed",
               "image_height", "epsilon", "server_optimizer",
               "rounds_per_eval"):
    assert name in plain, name
  for name in ("tfrecords_dir", "save_model_dir", "eval_batch_size",
               "rounds_per_checkpoint", "backend", "num_workers",
               "model_layout", "show_progress"):
    assert name not in plain, name
  # Without DP more rounds continue the run; with DP the noise depends on
  # them, as on the clipping settings.
  assert "total_rounds" not in plain and "l2_norm_clip" not in plain
  with_dp = _identity(epsilon=2.0)
  assert {"total_rounds", "l2_norm_clip", "dp_calibration"} <= set(with_dp)
  assert "iid" not in plain and "iid_seed" in _identity(iid=True)


def test_flag_settings_leave_out_the_settings_without_a_flag():
  config = config_lib.build(config_lib.CentralConfig,
                            {"tfrecords_dir": "t", "save_model_dir": "s"})
  recorded = config_lib.flag_settings(config)
  assert recorded["num_epochs"] == 100 and "shuffle_buffer_size" not in (
      recorded)
  everything = config_lib.settings_of(config)
  assert everything["shuffle_buffer_size"] == (
      config_lib.DEFAULT_SHUFFLE_BUFFER_SIZE)
  assert len(everything) == sum(
      len(dataclasses.fields(p))
      for p in config_lib.parts(config_lib.CentralConfig).values())
