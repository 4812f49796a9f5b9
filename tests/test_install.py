"""The locks `make install` installs from agree with the requirements files.

`requirements.lock` (CPU) and `requirements-gpu.lock` (`make install GPU=1`)
are the whole resolution with hashes, made by `make lock`. The fast test reads
the files only; the slow ones ask `uv` (installed by `make install`) and the
package index, and are skipped where either cannot be reached.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NETWORK_ERRORS = ("Failed to fetch", "error sending request", "dns error",
                   "Connection refused", "timed out")
# lock file -> the requirements files it resolves.
_LOCKS = {
    "requirements.lock": ("requirements.txt",),
    "requirements-gpu.lock": ("requirements.txt", "requirements-gpu.txt"),
}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")


def _name(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _read_requirements(path):
  """Returns {normalised name: version} of the `name==version` lines."""
  pins = {}
  with open(os.path.join(REPO_ROOT, path)) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      match = _PIN.match(line)
      assert match, f"{path}: not an exact pin: {line!r}"
      pins[_name(match.group(1))] = match.group(3)
  return pins


def _read_lock(path):
  """Returns {name: (version, has_hash, sources in its `# via` note)}."""
  entries, current = {}, None
  with open(os.path.join(REPO_ROOT, path)) as f:
    for line in f:
      match = _PIN.match(line)
      if match:
        current = _name(match.group(1))
        entries[current] = [match.group(3), False, set()]
      elif current and line.strip().startswith("--hash=sha256:"):
        entries[current][1] = True
      elif current and line.startswith("    #"):
        note = line.strip("# \n").removeprefix("via").strip()
        if note:
          entries[current][2].add(note)
  return {k: (v, h, via) for k, (v, h, via) in entries.items()}


def _uv():
  uv = os.path.join(os.path.dirname(sys.executable), "uv")
  if not os.path.isfile(uv):
    pytest.skip(f"uv not found at {uv} (make install provides it)")
  return uv


@pytest.mark.parametrize("lock", sorted(_LOCKS))
def test_lock_pins_every_requirement_at_its_version(lock):
  locked = _read_lock(lock)
  wanted = {}
  for requirements in _LOCKS[lock]:
    wanted.update(_read_requirements(requirements))
  stale = "is out of date; run `make lock` (README \"Install\")"
  for name, version in wanted.items():
    assert name in locked, f"{lock} {stale}: {name} is not in it"
    assert locked[name][0] == version, (
        f"{lock} {stale}: {name}=={locked[name][0]}, requirements say "
        f"{version}")
  direct = {name for name, (_, _, via) in locked.items()
            if any(v.startswith("-r requirements") for v in via)}
  assert direct == set(wanted), (
      f"{lock} {stale}: packages named by the requirements files differ: "
      f"{sorted(direct ^ set(wanted))}")
  # overrides.txt is applied (TFF 0.87's own jax pin does not resolve).
  overrides = _read_requirements("overrides.txt")
  for name in ("jax", "jaxlib"):
    assert locked[name][0] == overrides[name]
  assert "tensorrt" not in locked
  unhashed = [name for name, (_, has_hash, _) in locked.items()
              if not has_hash]
  assert not unhashed, f"{lock}: no hashes for {unhashed}"


@pytest.mark.slow
def test_locks_are_what_make_lock_produces(tmp_path):
  """Re-makes both locks (starting from the committed ones) and compares."""
  uv = _uv()
  if shutil.which("make") is None:
    pytest.skip("make not found")
  for lock in _LOCKS:
    shutil.copy(os.path.join(REPO_ROOT, lock), tmp_path / lock)
  command = ["make", "-s", "lock", f"UV={uv}",
             f"LOCK={tmp_path / 'requirements.lock'}",
             f"GPU_LOCK={tmp_path / 'requirements-gpu.lock'}"]
  # Offline first (uv's cache from `make install` usually suffices).
  result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env={**os.environ, "UV_OFFLINE": "1"})
  if result.returncode != 0:
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(e in output for e in _NETWORK_ERRORS):
      pytest.skip(f"package index unreachable: {output.strip()[-300:]}")
    assert result.returncode == 0, output[-3000:]

  def requirement_lines(path):
    # `# via` notes name the temporary paths; the pins and hashes must match.
    with open(path) as f:
      return [l.rstrip() for l in f if not l.lstrip().startswith("#")]

  for lock in _LOCKS:
    assert (requirement_lines(tmp_path / lock)
            == requirement_lines(os.path.join(REPO_ROOT, lock))), (
                f"{lock} is out of date; run `make lock`")


@pytest.mark.slow
def test_gpu_lock_installs_on_linux_with_its_hashes():
  """`make install GPU=1`'s command, as a dry run (installs nothing)."""
  uv = _uv()
  if not sys.platform.startswith("linux"):
    pytest.skip("the GPU lock is for Linux x86-64")
  result = subprocess.run(
      [uv, "pip", "install", "--python", sys.executable, "--dry-run",
       "--require-hashes", "--no-deps", "-r", "requirements-gpu.lock"],
      capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  output = result.stdout + result.stderr
  if result.returncode != 0 and any(e in output for e in _NETWORK_ERRORS):
    pytest.skip(f"package index unreachable: {output.strip()[-300:]}")
  assert result.returncode == 0, output[-3000:]
  # TensorFlow's CUDA libraries are part of the lock (or installed).
  assert "nvidia-cudnn-cu11" in output or "Audited" in output, output
  assert "tensorrt" not in output
