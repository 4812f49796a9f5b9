"""A command's flags parsed in the test process, in a FlagValues of their
own, and the trainers run from them in-process (`run_from_flags`): what the
command does after parsing, minus the wrapper that turns errors into one
line and an exit status (`cli.commands.exit_on_input_error`, which the
subprocess tests check). No flag lands in absl's global FLAGS, so any number
of commands can be parsed in one test process."""

import importlib

from absl import flags


def parse(module_name: str, *args: str) -> flags.FlagValues:
  """The flags of command `module_name` (its `_define_flags`) in a new
  FlagValues, parsed from `args` (absl raises IllegalFlagValueError on a
  missing required or malformed flag)."""
  flag_values = flags.FlagValues()
  importlib.import_module(module_name)._define_flags(flag_values)  # pylint: disable=protected-access
  flag_values(["prog", *args])
  return flag_values


def run_from_flags(module_name: str, *args: str) -> dict:
  """Runs trainer `module_name` (`benchmark.central_main` or
  `benchmark.federated_main`) in this process on `args`; returns its final
  metrics. Its FlairInputError, OutputWriteError or BackendDiedError
  propagates."""
  return importlib.import_module(module_name).run_from_flags(
      parse(module_name, *args))
