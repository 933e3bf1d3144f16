"""Run fastopt from this source checkout without installing it (`make gpu-check`, tests/gpu/gpu_check.py).

The package's kernels live in the top-level kernels/ directory and become the subpackage fastopt.kernels
only when fastopt is installed (setup.py package_dir; an editable install maps it the same way). A GPU
machine without network access gets nothing installed, so gpu_check puts this directory first on
PYTHONPATH: Python imports this module at start-up (and so does every Python process the stages start,
since they inherit PYTHONPATH), and it maps fastopt.kernels to this checkout's kernels/. The
sitecustomize module this one shadows, if the interpreter has one, is run afterwards.
"""
import importlib.abc
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_HERE)))
KERNELS = os.path.join(ROOT, "kernels")


class SourceKernelsFinder(importlib.abc.MetaPathFinder):
    """fastopt.kernels -> <checkout>/kernels (its subpackages follow through the package's __path__)."""

    def find_spec(self, name, path=None, target=None):
        if name != "fastopt.kernels":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(KERNELS, "__init__.py"),
                                                      submodule_search_locations=[KERNELS])


if not any(isinstance(f, SourceKernelsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, SourceKernelsFinder())  # first: an installed fastopt elsewhere must not win


def _run_shadowed():
    for entry in sys.path:
        directory = os.path.abspath(entry or os.curdir)
        candidate = os.path.join(directory, "sitecustomize.py")
        if directory != _HERE and os.path.isfile(candidate):
            with open(candidate) as f:
                code = compile(f.read(), candidate, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": candidate})
            return


_run_shadowed()
