"""On PYTHONPATH in tests/test_gpu_check.py: packages the lent GPU machine's image lacks become invisible.

Every Python process started with this folder on PYTHONPATH (the GPU check's section workers
included) sees the top-level packages named in ``VIDRAY_HIDE_PACKAGES`` (comma-separated) as
absent: ``import ray`` raises ModuleNotFoundError and ``importlib.util.find_spec("ray")`` is None,
as on a machine where they are not installed (transformers probes optional packages with
find_spec, so raising from it would not be the same).
"""

import os
import sys
from importlib.machinery import PathFinder

HIDDEN = frozenset(filter(None, os.environ.get("VIDRAY_HIDE_PACKAGES", "").split(",")))


class _HidingPathFinder:
    """sys.meta_path's PathFinder, blind to the hidden top-level packages."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return PathFinder.find_spec(name, path, target)

    def __getattr__(self, attr):  # invalidate_caches, find_distributions (package metadata stays visible)
        return getattr(PathFinder, attr)


if HIDDEN:
    sys.meta_path[:] = [_HidingPathFinder() if finder is PathFinder else finder for finder in sys.meta_path]
