"""The one place the version is written (pyproject.toml reads it, [tool.setuptools.dynamic], and
fastopt/__init__.py re-exports it), and where this copy of fastopt comes from: a source checkout or an
installed package."""
from __future__ import annotations

import os
import subprocess

__version__ = "0.1.0"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_checkout() -> str | None:
    """The root of the fastopt source tree this package runs from (setup.py and kernels/ beside fastopt/),
    or None when it is installed: then the directory above the package is site-packages, which is not
    fastopt's and may even lie inside the user's own git repository."""
    if os.path.isfile(os.path.join(_ROOT, "setup.py")) and os.path.isdir(os.path.join(_ROOT, "kernels", "cuda")):
        return _ROOT
    return None


def git_revision() -> str | None:
    """The git commit of the source checkout ("+dirty" with uncommitted changes to tracked files); None when
    installed, outside git, or when the checkout is not itself the top of its git repository."""
    root = source_checkout()
    if root is None:
        return None

    # without the caller's GIT_DIR, GIT_WORK_TREE, ... (a git hook, `git rebase -x`): they would name their
    # repository whatever directory git is pointed at
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10, env=env)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return None
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode or dirty.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
