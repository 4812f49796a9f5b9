"""Python imports this module at start-up in every process whose PYTHONPATH
holds this folder (tests only, see tests/small_model.py): such a process,
and each Python process it starts with the same PYTHONPATH, builds the
shallow test ResNet instead of ResNet-18."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "small_model.py")
_SPEC = importlib.util.spec_from_file_location("small_model", _PATH)
_small_model = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_small_model)
_small_model.use_on_import()
