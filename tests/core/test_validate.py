"""Tests of benchmark/core/validate.py, the one owner of integer and number
checks, and of the configs and functions that use it."""

import numpy as np
import pytest

from benchmark.core import errors
from benchmark.core import validate


def test_is_int_accepts_python_and_numpy_integers_only():
  assert validate.is_int(3) and validate.is_int(np.int64(-2))
  for value in (True, np.bool_(True), 1.0, "1", None):
    assert not validate.is_int(value), value


def test_check_int_names_the_value_and_the_minimum():
  validate.check_int("--rounds", 1)
  validate.check_int("--seed", 0, 0)
  with pytest.raises(errors.FlairInputError,
                     match=r"^--rounds must be an integer >= 1, got 0$"):
    validate.check_int("--rounds", 0)
  for bad in (True, 2.0, "3", None):
    with pytest.raises(errors.FlairInputError, match="--rounds"):
      validate.check_int("--rounds", bad)


def test_check_int_options():
  validate.check_int("cap", None, allow_none=True)
  with pytest.raises(errors.FlairInputError,
                     match=r"cap must be an integer >= 1 or None, got 0"):
    validate.check_int("cap", 0, allow_none=True)
  with pytest.raises(errors.FlairInputError,
                     match=r"users must be an integer >= 3 \(one per "
                     r"partition\), got 2"):
    validate.check_int("users", 2, 3, reason="one per partition")
  with pytest.raises(ValueError) as raised:
    validate.check_int("num_outputs", 0, error=ValueError)
  assert not isinstance(raised.value, errors.FlairInputError)


def test_check_ints_and_positive_number():
  validate.check_ints("crop_size", (2, np.int32(3)), 2)
  for bad in ((2,), (2, 0), (2, 2.0), [True, 2], "22"):
    with pytest.raises(errors.FlairInputError,
                       match="crop_size must be 2 integers >= 1"):
      validate.check_ints("crop_size", bad, 2)
  validate.check_positive_number("--lr", 0.5)
  for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
    with pytest.raises(errors.FlairInputError,
                       match="--lr must be a positive number"):
      validate.check_positive_number("--lr", bad)


def test_the_modules_refuse_bad_integers_with_the_shared_wording(tmp_path):
  # pylint: disable=import-outside-toplevel
  from benchmark.data import pipeline
  from benchmark.model import metrics
  from benchmark.prepare import synthetic
  from benchmark.training import config as config_lib
  with pytest.raises(errors.FlairInputError,
                     match=r"--num_epochs must be an integer >= 1, got 0"):
    config_lib.build(config_lib.CentralConfig, {
        "tfrecords_dir": "t", "save_model_dir": str(tmp_path),
        "num_epochs": 0})
  with pytest.raises(errors.FlairInputError,
                     match=r"--seed must be an integer >= 0, got -1"):
    config_lib.build(config_lib.CentralConfig, {
        "tfrecords_dir": "t", "save_model_dir": str(tmp_path), "seed": -1})
  with pytest.raises(errors.FlairInputError,
                     match=r"--total_rounds must be an integer >= 1, got 0"):
    config_lib.build(config_lib.FederatedConfig, {
        "tfrecords_dir": "t", "save_model_dir": str(tmp_path),
        "total_rounds": 0})
  with pytest.raises(errors.FlairInputError,
                     match=r"ClientSpec.batch_size must be an integer >= 1"):
    pipeline.ClientSpec(num_epochs=1, batch_size=True)
  with pytest.raises(ValueError,
                     match=r"num_outputs must be an integer >= 1, got 0"):
    metrics.metric_names(0)
  with pytest.raises(errors.FlairInputError,
                     match=r"num_users must be an integer >= 3"):
    synthetic.make_metadata(2)
