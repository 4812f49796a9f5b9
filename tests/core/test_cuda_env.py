"""CUDA's start-up settings (benchmark/core/cuda_env.py): set before
TensorFlow is imported, the user's own values kept, and the warning for
GPUs whose kernels TensorFlow only ships as PTX (faked capabilities: the
suite never runs on a GPU)."""

import os
import subprocess
import sys

from benchmark.core import cuda_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# TensorFlow 2.14's wheel, as tf.sysconfig.get_build_info() lists it.
TF_2_14 = ["sm_35", "sm_50", "sm_60", "sm_70", "sm_75", "compute_80"]


def _after_import(environ):
  # TensorFlow itself must see the settings: record them as it imports.
  code = ("import os, sys, importlib.abc\n"
          "seen = []\n"
          "class Spy(importlib.abc.MetaPathFinder):\n"
          "  def find_spec(self, name, path, target=None):\n"
          "    if name == 'tensorflow' and not seen:\n"
          "      seen.append((os.environ.get('CUDA_MODULE_LOADING'), "
          "os.environ.get('CUDA_CACHE_MAXSIZE')))\n"
          "sys.meta_path.insert(0, Spy())\n"
          "import benchmark.federated_main\n"
          "print(*seen[0])\n")
  result = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO_ROOT, env=environ,
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.split()[-2:]


def test_cuda_settings_are_in_place_before_tensorflow_is_imported():
  environ = {k: v for k, v in os.environ.items()
             if k not in cuda_env.DEFAULTS}
  environ["PYTHONPATH"] = REPO_ROOT
  assert _after_import(environ) == ["LAZY", str(cuda_env.CACHE_MAXSIZE_BYTES)]
  # A user's own values win.
  environ.update(CUDA_MODULE_LOADING="EAGER", CUDA_CACHE_MAXSIZE="1000")
  assert _after_import(environ) == ["EAGER", "1000"]


def test_only_gpus_without_machine_code_are_warned_about():
  assert cuda_env.has_native_kernels((7, 5), TF_2_14)
  assert not cuda_env.has_native_kernels((8, 0), TF_2_14)  # PTX only.
  assert not cuda_env.has_native_kernels((9, 0), TF_2_14)
  assert cuda_env.compilation_warning([], TF_2_14, {}) is None
  assert cuda_env.compilation_warning([("T4", (7, 5))], TF_2_14, {}) is None
  warning = cuda_env.compilation_warning(
      [("T4", (7, 5)), ("NVIDIA H200", (9, 0))], TF_2_14,
      {"CUDA_CACHE_PATH": "/cache", "CUDA_CACHE_MAXSIZE": "4294967296"})
  assert "NVIDIA H200 (compute capability 9.0)" in warning
  assert "T4" not in warning
  assert "expect minutes" in warning and "/cache" in warning
  assert "\n" not in warning
