"""The C++ compiler the tests that build shims of kernel headers use: $CXX, else g++, c++ or clang++. Without
one such a test skips, and under CI (CI set) it fails, as the build-matrix tests do."""
from __future__ import annotations

import os
import shutil

import pytest


def cxx_compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    if os.environ.get("CI"):
        pytest.fail("no C++ compiler found (CI requires one)")
    pytest.skip("no C++ compiler found")
