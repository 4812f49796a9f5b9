"""A config's command-line flags, defined from its declarations and parsed
back into the config.

Each setting of a `training.config` part is declared once (its field: name,
default, help, choices, bounds); this module turns the declarations of a
whole config type into absl flags and the parsed flags into the config,
so a flag's name is written in one place.
"""

import dataclasses
import typing
from typing import Any, Optional

from absl import flags

from benchmark.training import config as config_lib


def _base_type(annotation) -> type:
  """`int` for `int` and `Optional[int]`, and so on."""
  arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
  return arguments[0] if arguments else annotation


def _define(field: dataclasses.Field, annotation, help_text: str,
            flag_values: flags.FlagValues) -> None:
  declared = config_lib.declaration(field)
  kind = _base_type(annotation)
  if declared.choices is not None:
    flags.DEFINE_enum(field.name, field.default, list(declared.choices),
                      help_text, flag_values=flag_values)
  elif kind is bool:
    flags.DEFINE_boolean(field.name, field.default, help_text,
                         flag_values=flag_values)
  elif kind is int:
    flags.DEFINE_integer(field.name, field.default, help_text,
                         flag_values=flag_values)
  elif kind is float:
    flags.DEFINE_float(field.name, field.default, help_text,
                       flag_values=flag_values)
  elif kind is str:
    flags.DEFINE_string(field.name, field.default, help_text,
                        flag_values=flag_values)
  else:
    raise TypeError(f"setting {field.name} has a type no flag takes: "
                    f"{annotation}")
  if declared.required:
    flags.mark_flag_as_required(field.name, flag_values=flag_values)


def define_config_flags(config_type: type, flag_values: flags.FlagValues,
                        **help_values: str) -> None:
  """Defines a flag for every setting of `config_type` that has one.

  Args:
    config_type: a whole config type (`training.config.FederatedConfig`,
      `CentralConfig`).
    flag_values: where to define them (absl's `flags.FLAGS`, or a
      `FlagValues` of a test).
    **help_values: the values of the placeholders in help strings
      (`trainer`, `outputs`, `restore_use`, `runs_dir`).

  Raises:
    TypeError: a setting whose type no absl flag takes.
  """
  for part in config_lib.parts(config_type).values():
    hints = typing.get_type_hints(part)
    for field in dataclasses.fields(part):
      declared = config_lib.declaration(field)
      if declared.flag:
        _define(field, hints[field.name],
                declared.help.format(**help_values), flag_values)


def config_from_flags(config_type: type, flag_values: flags.FlagValues,
                      overrides: Optional[dict[str, Any]] = None):
  """The parsed flags of `config_type`'s settings as a config
  (`training.config.build`); settings without a flag keep their defaults,
  `overrides` replace values (e.g. a chosen `save_model_dir`).

  Raises:
    FlairInputError: a value its part refuses, naming the flag.
  """
  values = {field.name: flag_values[field.name].value
            for field in config_lib.declared_settings(config_type)
            if config_lib.declaration(field).flag}
  values.update(overrides or {})
  return config_lib.build(config_type, values)
