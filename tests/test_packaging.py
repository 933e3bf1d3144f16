"""What `pip install fastopt` installs: setup.py's packages and package data, built with build_py into a
scratch tree (what a wheel holds, less the compiled extension, copied in from the in-place build), hold
every module and kernel source of the checkout, and import from there, away from the checkout."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source directory -> its package in the installed tree (setup.py: package_dir)
SOURCE_ROOTS = {"fastopt": "fastopt", "kernels": os.path.join("fastopt", "kernels")}
# the files a user's install needs besides the Python modules: stubs, the kernel sources NVRTC and
# Numba compile at run time, the Cython and C++ sources of the CPU extension
SHIPPED = (".py", ".pyi", ".cu", ".cuh", ".hpp", ".pyx", "py.typed")


def _checkout_files():
    files = set()
    for source, installed in SOURCE_ROOTS.items():
        for root, dirs, names in os.walk(os.path.join(REPO, source)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                if name.endswith(SHIPPED):
                    rel = os.path.relpath(os.path.join(root, name), os.path.join(REPO, source))
                    files.add(os.path.normpath(os.path.join(installed, rel)))
    return files


@pytest.fixture(scope="module")
def installed_tree(tmp_path_factory):
    pytest.importorskip("Cython", reason="setup.py needs Cython")
    lib = tmp_path_factory.mktemp("build-lib")
    # egg_info in a scratch directory: its file list decides the package data, and one left in the checkout
    # by an earlier build (sdist, wheel) would supply files that setup.py itself no longer names
    egg = tmp_path_factory.mktemp("egg-info")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg),
                           "build_py", "--build-lib", str(lib)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return lib


def test_every_module_and_kernel_source_is_shipped(installed_tree):
    built = set()
    for root, _, names in os.walk(installed_tree):
        built.update(os.path.relpath(os.path.join(root, name), installed_tree) for name in names)
    expected = _checkout_files()
    assert expected, "no sources found"
    assert not expected - built, f"in the checkout but not in the installed tree: {sorted(expected - built)}"
    # the distributed package was once missing from the hand-written package list
    assert os.path.join("fastopt", "distributed", "sharded.py") in built
    assert os.path.join("fastopt", "kernels", "cuda", "update.cu") in built


def test_installed_tree_imports_away_from_the_checkout(installed_tree, tmp_path):
    extension = importlib.util.find_spec("fastopt.kernels.cpu._cpu_fast")
    if extension is None or extension.origin is None:
        pytest.skip("the CPU extension is not built in place")
    shutil.copy(extension.origin, os.path.join(installed_tree, "fastopt", "kernels", "cpu"))
    script = textwrap.dedent("""
        import importlib, os, pkgutil, sys
        import numpy as np
        lib = sys.argv[1]
        import fastopt
        assert fastopt.__file__.startswith(lib), fastopt.__file__
        missing_optional = []
        for info in pkgutil.walk_packages(fastopt.__path__, "fastopt."):
            if info.name.endswith("__main__"):
                continue  # runs the CLI
            try:
                module = importlib.import_module(info.name)
            except ImportError as exc:  # an optional dependency (torch, mpi4py, cupy) may be missing
                if (exc.name or "").startswith("fastopt"):
                    raise
                missing_optional.append(info.name)
                continue
            assert module.__file__.startswith(lib), module.__file__
        import fastopt.distributed.sharded, fastopt.kernels.cpu._cpu_fast
        # an editable install of the checkout would supply what the tree lacks: every module from the tree
        strays = [name for name, module in list(sys.modules.items()) if name.startswith("fastopt")
                  and not (getattr(module, "__file__", None) or lib).startswith(lib)]
        assert not strays, f"imported from outside the installed tree: {strays}"
        from fastopt import _version
        from fastopt.backends import cuda_source
        # installed: no source checkout above the package (site-packages may sit in the user's own git repo)
        assert _version.source_checkout() is None and _version.git_revision() is None
        assert cuda_source.write_family_header(check_only=True), "the shipped families.cuh is stale"
        try:
            cuda_source.write_family_header()
        except RuntimeError as exc:
            assert "installed" in str(exc), exc
        else:
            raise AssertionError("an installed families.cuh was rewritten")
        source = cuda_source.kernel_source()  # the packaged kernel sources, as NVRTC gets them
        assert "adam_math" in source and '#include "' not in source, "kernel sources missing or not inlined"
        p = np.ones(5); g = np.full(5, 0.5); m = np.zeros(5); v = np.zeros(5)
        fastopt.adam_step(p, g, m, v, step=1, lr=0.1)
        assert np.allclose(p, 0.9), p
        print("ok", len(missing_optional))
    """)
    env = dict(os.environ, PYTHONPATH=str(installed_tree))
    proc = subprocess.run([sys.executable, "-c", script, str(installed_tree)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def test_git_revision_is_only_that_of_fastopts_own_checkout(tmp_path, monkeypatch):
    """The GPU benchmark stamps its JSON with git_revision(): never the commit of a repository that merely
    contains fastopt (a venv inside the user's project, a vendored copy)."""
    from fastopt import _version
    if shutil.which("git") is None:
        pytest.skip("no git")

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True, capture_output=True)

    git("init", "-q", str(tmp_path))  # the user's repository
    site = tmp_path / ".venv" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(_version, "_ROOT", str(site))
    assert _version.source_checkout() is None and _version.git_revision() is None
    tree = tmp_path / "vendored"
    (tree / "kernels" / "cuda").mkdir(parents=True)
    (tree / "setup.py").write_text("")
    monkeypatch.setattr(_version, "_ROOT", str(tree))
    assert _version.source_checkout() == str(tree)
    assert _version.git_revision() is None  # a source tree, but the git repository around it is not its own
    git("init", "-q", str(tree))
    git("-C", str(tree), "add", "setup.py")
    git("-C", str(tree), "commit", "-q", "-m", "one")
    revision = _version.git_revision()
    assert len(revision) == 40 and int(revision, 16) >= 0
    monkeypatch.setenv("GIT_DIR", str(tmp_path / ".git"))  # a caller's git environment (a hook) is not read
    assert _version.git_revision() == revision
    monkeypatch.delenv("GIT_DIR")
    (tree / "setup.py").write_text("changed")
    assert _version.git_revision() == revision + "+dirty"
