"""CUDA's start-up settings for TensorFlow on GPUs, and the one warning a
GPU without native kernels in the installed TensorFlow deserves.

TensorFlow 2.14's wheel (the one TFF 0.87 allows) holds GPU machine code
(SASS) for a few compute capabilities and PTX for the newest it knows
(`tf.sysconfig.get_build_info()["cuda_compute_capabilities"]`: sm_35, sm_50,
sm_60, sm_70, sm_75 and compute_80). On any other GPU (8.6, 8.9, 9.0: RTX 30
and 40 series, L4, H100, H200) the CUDA driver compiles each kernel from
PTX when it is first loaded. Two CUDA variables make that bearable
(CUDA C++ Programming Guide, "CUDA Environment Variables" and "Lazy
Loading"): `CUDA_MODULE_LOADING=LAZY` compiles only the kernels a run uses
(CUDA >= 11.7), and `CUDA_CACHE_MAXSIZE` (bytes, at most 4 GiB) lets the
driver's JIT cache keep them for later runs; its default (256 MiB) does not
hold TensorFlow's. `set_defaults` sets both, unless the user did, before
TensorFlow is imported (the package does it on import).
"""

import os
from typing import Mapping, MutableMapping, Optional, Sequence

from absl import logging

# CUDA's own maximum for the JIT cache: 4 GiB.
CACHE_MAXSIZE_BYTES = 4 * 1024**3
DEFAULTS = {"CUDA_MODULE_LOADING": "LAZY",
            "CUDA_CACHE_MAXSIZE": str(CACHE_MAXSIZE_BYTES)}
# Where the driver keeps its JIT cache unless CUDA_CACHE_PATH says.
_DEFAULT_CACHE_PATH = os.path.join("~", ".nv", "ComputeCache")


def set_defaults(environ: Optional[MutableMapping[str, str]] = None) -> None:
  """Sets `DEFAULTS` in `environ` (the process environment by default)
  where the user has not set them. Takes effect only before TensorFlow
  loads CUDA, and in processes started later (Ray's actors, TFF's worker)."""
  environ = os.environ if environ is None else environ
  for name, value in DEFAULTS.items():
    environ.setdefault(name, value)


def has_native_kernels(capability: tuple[int, int],
                       build_capabilities: Sequence[str]) -> bool:
  """Whether TensorFlow was built with machine code for a GPU of compute
  capability `capability` ((major, minor), e.g. (9, 0)), given
  `build_capabilities` as `tf.sysconfig.get_build_info()` lists them
  ("sm_75": machine code; "compute_80": PTX only)."""
  major, minor = capability
  return f"sm_{major}{minor}" in build_capabilities


def compilation_warning(gpus: Sequence[tuple[str, tuple[int, int]]],
                        build_capabilities: Sequence[str],
                        environ: Mapping[str, str]) -> Optional[str]:
  """The warning for the GPUs of `gpus` ((name, compute capability)) that
  have no machine code in TensorFlow (`has_native_kernels`), as one line,
  or None when every GPU has it (or there is none)."""
  compiled = [f"{name} (compute capability {major}.{minor})"
              for name, (major, minor) in gpus
              if not has_native_kernels((major, minor), build_capabilities)]
  if not compiled:
    return None
  cache = environ.get("CUDA_CACHE_PATH", _DEFAULT_CACHE_PATH)
  return (
      f"the installed TensorFlow has no GPU machine code for "
      f"{', '.join(compiled)}: the first run compiles its kernels from PTX "
      f"(expect minutes before the first round); later runs reuse them from "
      f"CUDA's cache at {cache} (CUDA_CACHE_MAXSIZE="
      f"{environ.get('CUDA_CACHE_MAXSIZE', 'unset')} bytes)")


def warn_if_kernels_compile() -> None:
  """Logs `compilation_warning` for the GPUs TensorFlow sees, once per call
  (the trainers call it at start-up). Imports TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = []
  for device in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(device)
    if "compute_capability" in details:
      gpus.append((details.get("device_name", device.name),
                   tuple(details["compute_capability"])))
  build = tf.sysconfig.get_build_info().get("cuda_compute_capabilities", [])
  warning = compilation_warning(gpus, build, os.environ)
  if warning:
    logging.warning("%s.", warning)
