"""Tests of the presets in configs/ (absl flag files: `--flagfile
configs/<name>.flags`).

Each preset is parsed as its command parses it and checked against the
values of its source, written here from the source (the comment at the top
of each file names it): apple/ml-flair's README and the flag defaults of
its benchmark/federated_main.py and central_main.py, apple/pfl-research's
benchmarks/flair/configs/baseline.yaml, benchmarks/flair/train.py and
benchmarks/utils/argument_parsing.py. Then each runs for two rounds (or
epochs) at demo scale: the tiny network, 32x32 crops and tiny cohorts given
on the command line after the flag file (later flags win).
"""

import os

import numpy as np
import pytest

from benchmark.model import resnet
import flag_harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")
FEDERATED = "benchmark.federated_main"
CENTRAL = "benchmark.central_main"

# apple/ml-flair benchmark/federated_main.py flag defaults (README,
# "Training in federated setting"); server Adam epsilon 0.01 is in its code.
_ML_FLAIR = dict(
    client_optimizer="sgd", client_learning_rate=0.1, client_clipnorm=10.0,
    client_clip_scope="per_weight", client_weighting="examples",
    server_optimizer="adam", server_learning_rate=0.1, server_epsilon=0.01,
    server_lr_schedule="constant", clients_per_round=200,
    client_epochs_per_round=2, client_batch_size=16,
    max_elements_per_client=512, total_rounds=5000, rounds_per_eval=10,
    eval_batch_size=512, image_height=224, image_width=224, epsilon=0.0)
# ml-flair README, "... with differential privacy": --epsilon=2.0
# --l2_norm_clip=0.1, adaptive clipping at quantile 0.1 (its default), its
# compute_noise calibration.
_ML_FLAIR_DP = dict(_ML_FLAIR, epsilon=2.0, l2_norm_clip=0.1,
                    target_unclipped_quantile=0.1, dp_mechanism="gaussian",
                    accountant="rdp", dp_calibration="original",
                    simulated_clients_per_round=None, dp_population=None,
                    dp_delta=None)
# pfl-research baseline.yaml (cohort_size 200, central_num_iterations 5000,
# local_batch_size 16, local_num_epochs 2, local_learning_rate 0.01,
# learning_rate 0.1, max_num_user_images 512, evaluation_frequency 20,
# central_eval_batch_size 512) and train.py (AdamW eps 0.01, betas
# (0.9, 0.99), weight_decay 0; polynomial decay, 30 warm-up steps, lr_end
# 0.02, power 1; local_max_grad_norm 10 by global norm), weight 1 per user.
_PFL = dict(
    client_optimizer="sgd", client_learning_rate=0.01, client_clipnorm=10.0,
    client_clip_scope="global", client_weighting="uniform",
    server_optimizer="adamw", server_learning_rate=0.1, server_epsilon=0.01,
    server_beta_1=0.9, server_beta_2=0.99, server_weight_decay=0.0,
    server_lr_schedule="polynomial", server_lr_warmup_rounds=30,
    server_lr_decay_power=1.0, server_lr_end=0.02, clients_per_round=200,
    client_epochs_per_round=2, client_batch_size=16,
    max_elements_per_client=512, total_rounds=5000, rounds_per_eval=20,
    eval_batch_size=512, image_height=224, image_width=224, epsilon=0.0)
# pfl-research gaussian_moments_accountant: baseline.yaml central_epsilon
# 2.0, central_privacy_clipping_bound 0.1, noise_cohort_size 5000;
# argument_parsing.py central_delta 1e-5, population 1e7; a PLD accountant.
_PFL_DP = dict(_PFL, epsilon=2.0, l2_norm_clip=0.1,
               target_unclipped_quantile=0.0,
               simulated_clients_per_round=5000, dp_mechanism="gaussian",
               accountant="pld", dp_calibration="rounds",
               dp_population=10_000_000, dp_delta=1e-5)
# apple/ml-flair benchmark/central_main.py flag defaults (README, "Training
# in centralized setting").
_CENTRAL = dict(learning_rate=1e-4, clipnorm=10.0, train_batch_size=512,
                eval_batch_size=512, num_epochs=100, image_height=224,
                image_width=224)

PRESETS = {
    "ml_flair_fedavg": (FEDERATED, _ML_FLAIR),
    "ml_flair_fedavg_dp": (FEDERATED, _ML_FLAIR_DP),
    "pfl_flair_baseline": (FEDERATED, _PFL),
    "pfl_flair_dp": (FEDERATED, _PFL_DP),
    "central": (CENTRAL, _CENTRAL),
}
_DEMO_FEDERATED = dict(
    total_rounds=2, image_height=32, image_width=32,
    model_layout=resnet.TINY, clients_per_round=3, client_batch_size=2,
    max_elements_per_client=2, client_epochs_per_round=1, rounds_per_eval=2,
    eval_batch_size=16)
# Demo-scale DP: adaptive clipping of 3 clients needs noise multiplier < 0.3
# (docs/dp.md), so a larger epsilon; pfl's population of 10^7 makes the PLD
# search at 2 rounds slow (tiny multipliers), so a population of 30.
_DEMO = {
    "ml_flair_fedavg": _DEMO_FEDERATED,
    "ml_flair_fedavg_dp": dict(_DEMO_FEDERATED, epsilon=50.0),
    "pfl_flair_baseline": _DEMO_FEDERATED,
    "pfl_flair_dp": dict(_DEMO_FEDERATED, epsilon=0.5, dp_population=30,
                         simulated_clients_per_round=3),
    "central": dict(num_epochs=2, image_height=32, image_width=32,
                    model_layout=resnet.TINY, train_batch_size=4,
                    eval_batch_size=16),
}


def _flagfile(name):
  return f"--flagfile={os.path.join(CONFIGS, name + '.flags')}"


def test_every_preset_is_tested_and_states_its_source():
  names = sorted(n[:-len(".flags")] for n in os.listdir(CONFIGS)
                 if n.endswith(".flags"))
  assert names == sorted(PRESETS)
  for name in names:
    with open(os.path.join(CONFIGS, name + ".flags"), encoding="utf-8") as f:
      comments = "".join(line for line in f if line.startswith("#"))
    assert "Source:" in comments and "apple/" in comments, name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_has_its_sources_values(name):
  module, expected = PRESETS[name]
  flag_values = flag_harness.parse(module, _flagfile(name),
                                   "--tfrecords_dir=x")
  parsed = {key: flag_values[key].value for key in expected}
  assert parsed == pytest.approx(expected), name
  # Each value the preset sets is one of the expected ones.
  with open(os.path.join(CONFIGS, name + ".flags"), encoding="utf-8") as f:
    set_in_file = {line[2:].split("=")[0] for line in f
                   if line.startswith("--")}
  assert set_in_file <= set(expected), set_in_file - set(expected)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs_two_rounds_at_demo_scale(name, prepared_sample_dir,
                                              tmp_path):
  module, _ = PRESETS[name]
  overrides = [f"--{k}={v}" for k, v in _DEMO[name].items()]
  final = flag_harness.run_from_flags(
      module, _flagfile(name), f"--tfrecords_dir={prepared_sample_dir}",
      f"--save_model_dir={tmp_path / 'run'}", *overrides)
  assert np.isfinite(final["test"]["loss"])
  assert ("privacy" in final) == name.endswith("_dp")
