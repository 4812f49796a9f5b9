"""A trainer's run directory (`--save_model_dir`): what run it holds
(`run.json`), locked and claimed by one run, refused to another, fresh by
default.

A run locks its directory (`lock_save_dir`: `core.locks.DirectoryLock`, the
file `.lock`, released by the operating system when the process dies) before
it claims it (`claim_save_dir`), and holds the lock until it ends, so that a
second run into the same directory is refused while the first runs. The
lock file is not a run output: it never makes a directory look like it
holds a run (`run_outputs_in`) and `--overwrite` never removes it.
"""

import datetime
import fnmatch
import hashlib
import json
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

from absl import logging

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.core import locks


def labels_identity(names: Sequence[str], use_fine_grained_labels: bool,
                    binary_label: Optional[str]) -> dict[str, Any]:
  """The label part of a run identity.

  Args:
    names: the label set's names in index order (`data.LabelSpec.names`).
    use_fine_grained_labels: fine-grained instead of coarse labels.
    binary_label: the single label predicted, or None.

  Returns:
    `{"set": "coarse"|"fine-grained", "binary_label": ..., "num_labels": n,
    "names_sha256": hex digest of the names in index order}`: two runs with
    the same label index file agree; a label index with another label or
    another order does not.
  """
  digest = hashlib.sha256(
      json.dumps(list(names), ensure_ascii=False).encode("utf-8")).hexdigest()
  return {"set": "fine-grained" if use_fine_grained_labels else "coarse",
          "binary_label": binary_label, "num_labels": len(names),
          "names_sha256": digest}


def model_identity(pretrained: bool, num_outputs: int,
                   architecture: str = "resnet18") -> dict[str, Any]:
  """The model part of a run identity: the network (`--model_layout`, e.g.
  "resnet18"), with GroupNorm, or with frozen BatchNorm when fine-tuned from
  `--restore_model_path` (`pretrained`), and its number of outputs."""
  return {"architecture": architecture,
          "normalization": "batch" if pretrained else "group",
          "num_outputs": int(num_outputs)}


def run_identity(trainer: str, labels: Mapping[str, Any],
                 model: Mapping[str, Any],
                 settings: Mapping[str, Any]) -> dict[str, Any]:
  """What a run is, as recorded in `<save_model_dir>/run.json`.

  Args:
    trainer: "central" or "federated".
    labels: `labels_identity(...)`.
    model: the model built, e.g. `{"architecture": "resnet18",
      "normalization": "group", "num_outputs": 17}`.
    settings: flag name -> value, for the flags that change results (not the
      output directory, batch sizes of evaluation, checkpoint frequency, or
      the number of epochs/rounds when more of them continue the same run).

  Returns:
    A JSON-serialisable dict; two runs may share a directory only when their
    identities are equal.
  """
  return {"trainer": trainer, "labels": dict(labels), "model": dict(model),
          "settings": dict(settings)}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two run identities."""
  if old.get("trainer") != new.get("trainer"):
    return [f"it holds a {old.get('trainer')} run, this is a "
            f"{new.get('trainer')} run"]
  found = []
  old_settings = old.get("settings") or {}
  new_settings = new.get("settings") or {}
  for name in sorted(set(old_settings) | set(new_settings)):
    if old_settings.get(name, "(unset)") != new_settings.get(name, "(unset)"):
      found.append(f"--{name} is {old_settings.get(name, '(unset)')!r} there, "
                   f"{new_settings.get(name, '(unset)')!r} now")
  old_labels = old.get("labels") or {}
  new_labels = new.get("labels") or {}
  if old_labels != new_labels and not found:
    found.append(
        f"its label set differs ({old_labels.get('num_labels')} "
        f"{old_labels.get('set')} labels there, {new_labels.get('num_labels')}"
        f" {new_labels.get('set')} labels now from the label index of "
        "--tfrecords_dir)")
  if (old.get("model") or {}) != (new.get("model") or {}) and not found:
    found.append(f"its model differs ({old.get('model')} there, "
                 f"{new.get('model')} now)")
  if not found and dict(old) != dict(new):
    found.append("its recorded run identity differs")
  return found


def run_outputs_in(save_model_dir: str) -> list[str]:
  """The names in `save_model_dir` that a trainer writes (sorted): the
  `constants.RUN_OUTPUT_NAMES`, best-weights files and temporary files of
  `atomic_path` for them. Other files, the lock file (`locks.LOCK_FILE`)
  among them, are not a run's and are never touched."""
  try:
    names = os.listdir(save_model_dir)
  except FileNotFoundError:
    return []
  weights = constants.BEST_WEIGHTS_FILE_PATTERN.format(architecture="*",
                                                       trainer="*",
                                                       num_outputs="*")
  found = []
  for name in names:
    base = name
    if name.startswith(".") and name.endswith(".tmp"):
      base = name[1:name.rfind(".", 0, len(name) - len(".tmp"))]
    if base in constants.RUN_OUTPUT_NAMES or fnmatch.fnmatch(base, weights):
      found.append(name)
  return sorted(found)


_WHAT_TO_DO = ("use another --save_model_dir, or add --overwrite to delete "
               "that run's files and start afresh")


def _remove_outputs(save_model_dir: str, outputs: list[str]) -> None:
  """Removes an earlier run's outputs (`--overwrite`)."""
  with file_io.output_errors(save_model_dir):
    for name in outputs:
      path = os.path.join(save_model_dir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  logging.warning("--overwrite: removed %d output(s) of the earlier run in "
                  "%s (%s)", len(outputs), save_model_dir, ", ".join(outputs))


def _check_same_run(save_model_dir: str, outputs: list[str],
                    identity: Mapping[str, Any]) -> None:
  """Raises FlairInputError unless the directory's run.json records
  `identity` (a directory with outputs but no run.json is refused too)."""
  run_path = os.path.join(save_model_dir, constants.RUN_IDENTITY_FILE)
  try:
    with open(run_path, encoding="utf-8") as f:
      previous = json.load(f)
  except FileNotFoundError:
    raise errors.FlairInputError(
        f"--save_model_dir {save_model_dir!r} holds outputs of an earlier "
        f"run whose settings were not recorded ({', '.join(outputs[:4])}"
        f"{', ...' if len(outputs) > 4 else ''}); {_WHAT_TO_DO}") from None
  except (OSError, ValueError) as e:
    raise errors.FlairInputError(
        f"--save_model_dir {save_model_dir!r}: {run_path} cannot be read "
        f"({e}); {_WHAT_TO_DO}") from e
  differences = _differences(previous, identity)
  if differences:
    raise errors.FlairInputError(
        f"--save_model_dir {save_model_dir!r} holds a different run: "
        f"{'; '.join(differences)}; {_WHAT_TO_DO}")


def _write_flags(save_model_dir: str, flag_values: Mapping[str, Any]) -> None:
  """Writes flags.json, warning about the values that changed since the
  last run here (e.g. a longer `--num_epochs`)."""
  path = os.path.join(save_model_dir, constants.FLAGS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
  except (OSError, ValueError):
    previous = {}
  changed = sorted(k for k in flag_values
                   if k in previous and previous[k] != flag_values[k])
  if changed:
    logging.warning(
        "%s was written by a run with other values of %s; the resumed run "
        "continues with the new values.", path,
        ", ".join(f"--{k} ({previous[k]!r} -> {flag_values[k]!r})"
                  for k in changed))
  file_io.write_json_atomic(path, dict(flag_values))


# The flag that names a run directory, in messages.
FLAG = "--save_model_dir"


def _make_save_dir(save_model_dir: str) -> None:
  """Creates `save_model_dir` with its parents (FlairInputError, one line,
  when it cannot be)."""
  try:
    os.makedirs(save_model_dir, exist_ok=True)
  except OSError as e:
    raise errors.FlairInputError(
        f"{FLAG} {save_model_dir!r} cannot be created: "
        f"{e.strerror}") from e


def lock_save_dir(save_model_dir: str) -> locks.DirectoryLock:
  """Creates `save_model_dir` and takes its lock for a run (see the module
  doc); the caller releases it when the run ends (`release`).

  Returns:
    The held `locks.DirectoryLock` (its file, `locks.LOCK_FILE`, names this
    process while held).

  Raises:
    locks.DirectoryLockedError: another process holds the lock: a run is
      writing there (one line naming the flag, the directory and that
      process).
    FlairInputError: the directory cannot be created.
    OutputWriteError: the lock file cannot be written (read-only, no
      permission, full disk), naming it.
  """
  _make_save_dir(save_model_dir)
  lock = locks.DirectoryLock(save_model_dir, FLAG)
  try:
    return lock.acquire()
  except OSError as e:
    raise file_io.output_write_error(lock.path, e, FLAG, exact=True) from e


def claim_save_dir(save_model_dir: str, identity: Mapping[str, Any],
                   flag_values: Mapping[str, Any],
                   overwrite: bool = False) -> bool:
  """Makes `save_model_dir` this run's: refuses another run's directory.

  Called with the directory's lock held (`lock_save_dir`), so that no other
  run reads or writes it meanwhile. Creates the directory, then:
  * with `overwrite`, removes every output of an earlier run there
    (`run_outputs_in`; other files are kept) and starts afresh;
  * if `run.json` holds the same identity, the run resumes (returns True);
  * if it holds another identity, or outputs of a run are there without a
    `run.json` (a run of an older version, whose settings are unknown), the
    run is refused;
  * otherwise (a new or empty directory) the run starts afresh.
  Then writes `run.json` and `flags.json` (every flag value; a warning lists
  the flags whose values changed since the last run here).

  Args:
    save_model_dir: the run's output directory (created with parents).
    identity: `run_identity(...)` of this run.
    flag_values: every flag of the command, name -> JSON-serialisable value.
    overwrite: the `--overwrite` flag.

  Returns:
    True when an earlier part of the same run is resumed, False for a fresh
    start.

  Raises:
    FlairInputError: the directory cannot be created, or it holds another
      run without `overwrite`: one line naming the directory, the settings
      that differ and what to do (another --save_model_dir or --overwrite).
    OutputWriteError: a storage failure removing old files or writing
      `run.json`/`flags.json`.
  """
  _make_save_dir(save_model_dir)
  outputs = run_outputs_in(save_model_dir)
  resumed = bool(outputs) and not overwrite
  if outputs and overwrite:
    _remove_outputs(save_model_dir, outputs)
  elif outputs:
    _check_same_run(save_model_dir, outputs, identity)
    logging.info("%s holds an earlier part of this run; resuming it.",
                 save_model_dir)
  file_io.write_json_atomic(
      os.path.join(save_model_dir, constants.RUN_IDENTITY_FILE),
      dict(identity))
  _write_flags(save_model_dir, flag_values)
  return resumed


def fresh_run_dir(trainer: str, parent: str = constants.DEFAULT_RUNS_DIR,
                  now: Optional[datetime.datetime] = None) -> str:
  """A new directory name for a run: `<parent>/<trainer>-<UTC time>`, with
  `-2`, `-3`, ... appended when that exists. Not created here.

  Args:
    trainer: "central" or "federated".
    parent: the runs directory (default `./runs`).
    now: the time to use (default: now, UTC).

  Returns:
    e.g. `runs/central-20260131-142501`.
  """
  now = now or datetime.datetime.now(datetime.timezone.utc)
  base = os.path.join(parent, f"{trainer}-{now:%Y%m%d-%H%M%S}")
  candidate, n = base, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{base}-{n}"
  return candidate


def best_weights_path(save_model_dir: str, trainer: str, num_outputs: int,
                      architecture: str) -> str:
  """Where a run keeps its best weights by val loss (Keras weights HDF5):
  `<save_model_dir>/<architecture>_<trainer>_<num_outputs>labels.h5`, e.g.
  `resnet18_federated_17labels.h5`."""
  name = constants.BEST_WEIGHTS_FILE_PATTERN.format(
      architecture=architecture, trainer=trainer, num_outputs=num_outputs)
  return os.path.join(save_model_dir, name)
