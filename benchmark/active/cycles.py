"""A federated active-learning run from its configuration: the cycles of
FedAvg training on the labelled images and selection of new ones, to its
final metrics (docs/active_learning.md).

`run_active(config, label_spec)`:

1. reads every training image's labels (`active.pools`) and draws each
   user's seed set (or takes the recorded one back, `active.records`);
2. builds the process (`active.process`) and opens the backend
   (`backends.factory`), as `training.federated` does;
3. for each cycle `c = 1..num_cycles`: starts from the initial weights
   (`--cycle_start afresh`) or the previous cycle's global model
   (`continue`), runs `--rounds_per_cycle` rounds with `training.loop`
   (checkpoints in `checkpoints/cycle_<c>/`, rows in metrics.csv with the
   run-wide round number), evaluates the global model on val and test,
   records the cycle, then, except after the last cycle, spends the budget
   (`active.selection`) and records the choice;
4. writes final_metrics.json (the last cycle's val/test metrics and every
   cycle's) and the final global weights.

A rerun resumes: recorded cycles are skipped, a cycle cut short resumes
after its latest checkpoint, and a selection cut short is redone from the
cycle's last checkpoint (it is a function of that state and the seeds).
"""

import asyncio
import collections
import os
from typing import Any

from absl import logging
import numpy as np

from benchmark.active import client_work
from benchmark.active import config as config_lib
from benchmark.active import pools
from benchmark.active import process as process_lib
from benchmark.active import records
from benchmark.active import selection
from benchmark.backends import base
from benchmark.core import constants
from benchmark.core import file_io
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import metrics as metrics_lib
from benchmark.training import checkpoints
from benchmark.training import cohorts
from benchmark.training import evaluation
from benchmark.training import federated
from benchmark.training import loop
from benchmark.training import models
from benchmark.training import outputs
from benchmark.training import run_dir
from benchmark.training import seeds

TRAINER_NAME = "active"
CYCLE_KEY = "cycle"


class CycleSampler(loop.Resumable):
  """The `training_selection_fn` of one cycle: round `r` of cycle `c` trains
  the cohort `cohorts.ClientSampler` draws for run-wide round
  `(c - 1) * rounds_per_cycle + r`, each client with its labelled mask and
  label counts (`selection.client_input`, training on, scoring off, KCFU's
  compensatory term on from the cycle's second round)."""

  def __init__(self, sampler: cohorts.ClientSampler,
               images: pools.TrainImages, masks, offset: int, kcfu: bool):
    self._sampler = sampler
    self._images = images
    self._index = {c: i for i, c in enumerate(images.client_ids)}
    self._masks = masks
    self._offset = offset
    self.kcfu = kcfu

  def resume_state(self) -> dict[str, Any]:
    return self._sampler.resume_state()

  def restore(self, values) -> None:
    self._sampler.restore(values)

  def __call__(self, round_num: int) -> list[tuple]:
    # KCFU's compensatory term is off in a cycle's first round, as in
    # KAFAL's code (`int(comm > 0)`): the teacher is the starting model.
    compensate = self.kcfu and round_num > 1
    return [selection.client_input(
        self._images, self._masks, self._index[client_id], seed, train=True,
        score=False, compensate=compensate)
            for client_id, seed in self._sampler(self._offset + round_num)]


class CycleRows:
  """A release manager of the whole run (metrics.csv) seen from one cycle:
  keys become run-wide round numbers, rows get the cycle; the evaluation
  of the starting model (round 0) is released for cycle 1 only."""

  def __init__(self, manager, cycle: int, offset: int):
    self._manager = manager
    self._cycle = cycle
    self._offset = offset

  async def release(self, value, key: int) -> None:
    if key == 0 and self._cycle > 1:
      return
    await self._manager.release({**value, CYCLE_KEY: self._cycle},
                                key=self._offset + key)


class ActiveRoundColumns(outputs.RoundColumns):
  """metrics.csv's columns of a training round: FedAvg's
  (`outputs.RoundColumns`) plus, with KCFU, `kcfu_balanced_loss` and
  `kcfu_compensation_loss` (the round's mean per batch); the score matrix
  (empty in training rounds) is left out.

  Args:
    metric_names: `metrics.metric_names(num_outputs)`.
    kcfu: whether the clients train with KCFU (`--strategy kafal`).
  """

  def __init__(self, metric_names, kcfu: bool):
    super().__init__(metric_names, initial_clip=0.0)
    self.kcfu = kcfu

  def __call__(self, round_metrics: Any) -> dict[str, float]:
    work = dict(round_metrics["client_work"])
    work.pop(client_work.SCORES_KEY)
    kcfu = work.pop(client_work.KCFU_KEY)
    row = super().__call__({**round_metrics, "client_work": work})
    if self.kcfu:
      for name, value in kcfu.items():
        row[f"{client_work.KCFU_KEY}_{name}"] = float(value)
    return row


def _cycle_checkpoints(save_model_dir: str, cycle: int
                      ) -> checkpoints.CheckpointManager:
  return checkpoints.CheckpointManager(os.path.join(
      checkpoints.checkpoint_dir(save_model_dir), f"cycle_{cycle}"))


def _end_state(save_model_dir: str, cycle: int, initial_state) -> Any:
  """The state after cycle `cycle`'s last round (its last checkpoint)."""
  # What `loop.run_rounds` saves: the state, the round, then the values of
  # its Resumable parameters (`CycleSampler`, `ActiveRoundColumns`).
  structure = collections.OrderedDict([
      (loop.STATE_KEY, initial_state), (loop.ROUND_KEY, 0),
      (cohorts.SAMPLING_SEED_KEY, 0), (outputs.DP_CLIP_KEY, 0.0)])
  loaded, _ = asyncio.run(_cycle_checkpoints(save_model_dir, cycle)
                          .load_latest(structure))
  return loaded[loop.STATE_KEY]


def run_active(config: config_lib.ActiveConfig,
               label_spec: label_sets.LabelSpec) -> dict[str, Any]:
  """Runs (or resumes) a federated active-learning run.

  Args:
    config: the validated configuration.
    label_spec: the labels of `config.data`.

  Returns:
    `{"val": {name: value}, "test": {...}, "cycles": [...],
    "rounds_completed": int, "labelled_images": int}` (the last cycle's
    global model; "cycles" as chosen_images.json's, without the choices),
    also written to final_metrics.json.

  Raises:
    FlairInputError: a bad data directory, or a run directory whose record
      does not fit the data.
    errors.ClientDataError, BackendDiedError, OutputWriteError: see
      `training.federated.run_federated`.
  """
  seeds.use_deterministic_ops(config.model.deterministic_ops)
  seeds.clear_global_seed()
  tfrecords_dir = config.data.tfrecords_dir
  images = pools.read_train_images(tfrecords_dir, label_spec)
  cohort_size = min(config.cohort.clients_per_round, len(images.client_ids))
  process = process_lib.build_process(
      config, label_spec, os.path.join(tfrecords_dir, constants.TRAIN),
      cohort_size, images.max_images)
  with federated.open_run_backend(config, process, cohort_size) as backend:
    return _run_cycles(config, label_spec, images, cohort_size, backend)


def _budget(config: config_lib.ActiveConfig,
            images: pools.TrainImages) -> int:
  """`--budget_per_cycle`, or its default share of the training images."""
  if config.active.budget_per_cycle is not None:
    return config.active.budget_per_cycle
  return int(np.ceil(config_lib.DEFAULT_BUDGET_FRACTION
                     * images.sizes.sum()))


class _Run:
  """What the cycles share: the config, data, backend and evaluation."""

  def __init__(self, config, label_spec, images, cohort_size, backend):
    self.config = config
    self.images = images
    self.cohort_size = cohort_size
    self.backend = backend
    num_outputs = label_spec.num_outputs
    self.names = metrics_lib.metric_names(num_outputs)
    self.eval_model = models.build_initial_model(config.model, num_outputs)
    self.eval_model.compile(loss=models.loss(),
                            metrics=metrics_lib.make_metrics(num_outputs))
    self.initial_state = backend.initialize(
        models.model_weights(self.eval_model))
    client_data = pipeline.load_client_data(config.data.tfrecords_dir,
                                            label_spec)
    self.datasets = {p: pipeline.eval_dataset(client_data[p],
                                              config.data.eval_batch_size)
                     for p in (constants.VAL, constants.TEST)}
    self.save_model_dir = config.output.save_model_dir
    self.csv = outputs.CsvRoundsManager(
        os.path.join(self.save_model_dir, constants.METRICS_CSV_FILE),
        [loop.EVAL_TIME_KEY] + [outputs.VAL_PREFIX + n for n in self.names])
    self.weights_path = run_dir.best_weights_path(
        self.save_model_dir, TRAINER_NAME, num_outputs,
        config.model.model_layout)

  def evaluate(self) -> dict[str, dict[str, float]]:
    """The backend's global model on val and test."""
    self.backend.get_model_weights().assign_weights_to(self.eval_model)
    return {p: evaluation.evaluate(self.eval_model, d)
            for p, d in self.datasets.items()}


def _start_state(run: _Run, cycle: int) -> Any:
  """The state cycle `cycle` starts from (module docstring, step 3)."""
  if (cycle == 1 or run.config.active.cycle_start
      == config_lib.CYCLE_START_AFRESH):
    return run.initial_state
  previous = _end_state(run.save_model_dir, cycle - 1, run.initial_state)
  run.backend.set_state(previous)
  return run.backend.initialize(run.backend.get_model_weights())


def _train_cycle(run: _Run, cycle: int, masks) -> None:
  """Runs (or resumes) the rounds of `cycle` on the labelled `masks`."""
  config = run.config
  rounds = config.active.rounds_per_cycle
  offset = (cycle - 1) * rounds
  evaluation_fn = evaluation.KerasEvaluation(
      run.eval_model, run.datasets[constants.VAL], outputs.VAL_PREFIX)
  sampler = CycleSampler(
      cohorts.ClientSampler(run.images.client_ids, run.cohort_size,
                            config.model.seed,
                            config.cohort.client_datasets_random_seed),
      run.images, masks, offset,
      config.active.strategy == config_lib.STRATEGY_KAFAL)
  logging.info("Cycle %d: %d labelled images; rounds %d-%d.", cycle,
               int(sum(m.sum() for m in masks)), offset + 1, offset + rounds)
  loop.run_rounds(
      run.backend, _start_state(run, cycle), sampler, rounds,
      _cycle_checkpoints(run.save_model_dir, cycle),
      metrics_managers=[CycleRows(run.csv, cycle, offset)],
      evaluation_fn=evaluation_fn,
      rounds_per_evaluation=config.run.rounds_per_eval,
      rounds_per_saving_program_state=config.run.rounds_per_checkpoint,
      round_metrics_fn=ActiveRoundColumns(run.names, sampler.kcfu))


def _run_cycles(config: config_lib.ActiveConfig,
                label_spec: label_sets.LabelSpec, images: pools.TrainImages,
                cohort_size: int, backend: base.RoundBackend
               ) -> dict[str, Any]:
  """The cycles (module docstring, step 3), then the final metrics."""
  run = _Run(config, label_spec, images, cohort_size, backend)
  active = config.active
  record = records.load(run.save_model_dir)
  if record is None:
    record = records.new_record(images, pools.seed_masks(
        images.sizes, config.model.seed, active.initial_labeled_fraction,
        active.initial_labeled_count))
    records.save(run.save_model_dir, record)
  else:
    logging.info("Resuming after %d recorded cycle(s).",
                 len(record[records.CYCLES_KEY]))
  masks = records.masks_of(record, images)
  budget = _budget(config, images)
  for cycle in range(1, active.num_cycles + 1):
    done = record[records.CYCLES_KEY]
    if len(done) < cycle:
      _train_cycle(run, cycle, masks)
      done.append({"cycle": cycle, "rounds_completed":
                   cycle * active.rounds_per_cycle,
                   **records.cycle_counts(masks), **run.evaluate()})
      records.save(run.save_model_dir, record)
    if cycle < active.num_cycles and records.CHOSEN_KEY not in done[cycle - 1]:
      backend.set_state(_end_state(run.save_model_dir, cycle,
                                   run.initial_state))
      chosen = selection.select(backend, images, masks, budget,
                                active.strategy, config.model.seed, cycle,
                                cohort_size)
      selection.check_choice(masks, chosen, budget)
      masks = pools.add_chosen(masks, chosen)
      records.add_choice(record, images, chosen)
      records.save(run.save_model_dir, record)
      logging.info("Cycle %d: %d images chosen (%s).", cycle,
                   sum(len(v) for v in chosen.values()), active.strategy)
  return _final_metrics(run, record)


def _final_metrics(run: _Run, record: dict[str, Any]) -> dict[str, Any]:
  """The last cycle's model on val and test, and every cycle's record,
  written to final_metrics.json; its weights to the weights file."""
  num_cycles = run.config.active.num_cycles
  last = record[records.CYCLES_KEY][num_cycles - 1]
  run.backend.set_state(_end_state(run.save_model_dir, num_cycles,
                                   run.initial_state))
  run.backend.get_model_weights().assign_weights_to(run.eval_model)
  file_io.save_keras_weights_h5(run.eval_model, run.weights_path)
  final = {
      constants.VAL: last[constants.VAL],
      constants.TEST: last[constants.TEST],
      "rounds_completed": last["rounds_completed"],
      "labelled_images": last["labelled_images"],
      "cycles": [{k: v for k, v in c.items() if k != records.CHOSEN_KEY}
                 for c in record[records.CYCLES_KEY][:num_cycles]],
  }
  file_io.write_json_atomic(os.path.join(run.save_model_dir,
                                         constants.FINAL_METRICS_FILE), final)
  return final
