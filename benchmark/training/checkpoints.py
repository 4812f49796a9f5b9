"""A federated run's checkpoints: TFF's file program-state manager that
resumes from the latest checkpoint it can read and reports a full disk in
one line.

Checkpoints live in `<save_model_dir>/checkpoints/program_state_<round>`.
TFF writes each to a temporary directory and renames it when complete, so a
run killed while saving leaves the previous checkpoint intact.
"""

import os
import shutil
from typing import Any, Optional

from absl import logging
import tensorflow_federated as tff

from benchmark.core import constants
from benchmark.core import file_io
from benchmark.core.errors import FlairInputError

CHECKPOINT_PREFIX = "program_state_"
# Checkpoints kept (the latest ones): one spare in case the latest is damaged.
CHECKPOINTS_KEPT = 2


def checkpoint_dir(save_model_dir: str) -> str:
  """`<save_model_dir>/checkpoints`."""
  return os.path.join(save_model_dir, constants.FEDERATED_CHECKPOINT_DIR)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class CheckpointManager(tff.program.FileProgramStateManager):
  """`tff.program.FileProgramStateManager` over a run's checkpoint folder,
  keeping the latest `CHECKPOINTS_KEPT`, with two changes:

  * `load_latest` removes what a save cut short left (a `_temp` directory,
    which no load reads), and when the latest checkpoint cannot be read (a
    file damaged after it was written) logs and removes it and returns the
    previous one;
  * `save` turns a storage failure into a one-line `OutputWriteError` naming
    the checkpoint, with nothing of it left behind.
  """

  def __init__(self, save_model_dir: str):
    self._dir = checkpoint_dir(save_model_dir)
    super().__init__(self._dir, prefix=CHECKPOINT_PREFIX,
                     keep_total=CHECKPOINTS_KEPT, keep_first=False)

  def _path(self, version: int) -> str:
    return os.path.join(self._dir, f"{CHECKPOINT_PREFIX}{version}")

  def _remove_unfinished(self) -> None:
    try:
      names = os.listdir(self._dir)
    except FileNotFoundError:
      return
    for name in sorted(names):
      if name.startswith(CHECKPOINT_PREFIX) and "_temp" in name:
        path = os.path.join(self._dir, name)
        logging.warning("Removing %s, a checkpoint whose saving was cut short "
                        "(the process was stopped while writing it).", path)
        shutil.rmtree(path, ignore_errors=True)

  async def load_latest(self, structure: Any) -> tuple[Optional[Any], int]:
    """The latest checkpoint that can be read with `structure`.

    Returns:
      `(program state, round)`, or `(None, 0)` when there is none.

    Raises:
      FlairInputError: there are checkpoints but none can be read with this
        structure (another configuration's, or all damaged); one line naming
        the directory and the first error.
    """
    self._remove_unfinished()
    unreadable = []
    for version in sorted(await self.get_versions() or [], reverse=True):
      try:
        loaded = await self.load(version, structure)
      except Exception as e:  # pylint: disable=broad-except
        # Damaged files, or a structure, shape or dtype mismatch.
        unreadable.append((self._path(version), e))
        continue
      for bad_path, error in unreadable:
        logging.warning(
            "Checkpoint %s cannot be read (%s); removed it and resuming from "
            "the previous checkpoint, %s.", bad_path, _first_line(error),
            self._path(version))
        shutil.rmtree(bad_path, ignore_errors=True)
      return loaded, version
    if unreadable:
      path, error = unreadable[0]
      raise FlairInputError(
          f"no checkpoint in {self._dir} can be read with this configuration "
          "(labels, model or DP settings differ, or the files are damaged); "
          f"use another --save_model_dir or delete {self._dir} "
          f"({os.path.basename(path)}: {_first_line(error)})") from error
    return None, 0

  async def save(self, program_state: Any, version: int) -> None:
    """Saves `program_state` as round `version`'s checkpoint.

    Raises:
      OutputWriteError: a storage failure (nothing of it is left).
    """
    with file_io.tff_output(self._path(version)):
      await super().save(program_state, version)
