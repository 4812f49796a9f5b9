"""The GPU install (`make install GPU=1`) resolves with the pinned stack.

Asks the package index for a resolution only (`uv pip install --dry-run`),
installs nothing; skipped where `uv` or the index cannot be reached.
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NETWORK_ERRORS = ("Failed to fetch", "error sending request", "dns error",
                   "Connection refused", "timed out")


@pytest.mark.slow
def test_gpu_requirements_resolve_with_the_pinned_stack():
  uv = os.path.join(os.path.dirname(sys.executable), "uv")
  if not os.path.isfile(uv):
    pytest.skip(f"uv not found at {uv} (make install provides it)")
  result = subprocess.run(
      [uv, "pip", "install", "--python", sys.executable, "--dry-run",
       "-r", "requirements.txt", "-r", "requirements-gpu.txt",
       "--override", "overrides.txt"],
      capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  output = result.stdout + result.stderr
  if result.returncode != 0 and any(e in output for e in _NETWORK_ERRORS):
    pytest.skip(f"package index unreachable: {output.strip()[-300:]}")
  assert result.returncode == 0, output[-3000:]
  # TensorFlow's CUDA libraries are part of the resolution (or installed).
  assert "nvidia-cudnn-cu11" in output or "no changes" in output, output
  assert "tensorrt" not in output
