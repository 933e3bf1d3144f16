"""The fuzz suite's session state: one seed per run (fresh unless FASTOPT_FUZZ_SEED pins it) and the
count of generated calls actually run, printed at the end of the session."""
from __future__ import annotations

import os

import numpy as np
import pytest

MIN_BAD_CALLS = 3000  # issue 9: at least 3,000 generated bad calls per CI run

_STATS = {"bad": 0, "ok": 0, "seed": None}


def fuzz_seed() -> int:
    if _STATS["seed"] is None:
        env = os.environ.get("FASTOPT_FUZZ_SEED")
        _STATS["seed"] = int(env) if env else int(np.random.SeedSequence().entropy % (2 ** 31))
    return _STATS["seed"]


@pytest.fixture(scope="session")
def fuzz_stats():
    """{'bad': calls expected to fail (or allowed to), 'ok': must-work calls, 'seed': the run's seed}."""
    fuzz_seed()
    return _STATS


def pytest_terminal_summary(terminalreporter):
    if _STATS["bad"] or _STATS["ok"]:
        terminalreporter.write_line(
            f"fastopt fuzz: {_STATS['bad']} generated bad calls and {_STATS['ok']} must-work calls run "
            f"(seed {_STATS['seed']}; rerun with FASTOPT_FUZZ_SEED={_STATS['seed']})")
