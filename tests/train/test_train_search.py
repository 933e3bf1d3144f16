"""Hyperparameter search: spaces, grid / random / TPE, parallel processes, table and JSON."""
import json

import numpy as np
import pytest

from fastopt.train.experiment import Experiment, recommended_config
from fastopt.train.search import (Choice, LogUniform, apply_params, format_table, grid_trials, optuna_available,
                                  random_trials, search)

SPACE = {"lr": LogUniform(1e-3, 1e-1), "batch_size": Choice((16, 64)), "weight_decay": Choice((0.0, 1e-3))}


def base():
    return Experiment(dataset="wine", train=recommended_config("wine", epochs=2, progress=False))


def test_grid_is_the_full_product():
    trials = grid_trials(SPACE, points=3)
    assert len(trials) == 3 * 2 * 2
    assert sorted({t["lr"] for t in trials}) == pytest.approx([1e-3, 1e-2, 1e-1])


def test_random_is_seeded_and_log_uniform():
    a, b = random_trials(SPACE, 400, seed=1), random_trials(SPACE, 400, seed=1)
    assert a == b and a != random_trials(SPACE, 400, seed=2)
    logs = np.log10([t["lr"] for t in a])
    assert logs.min() >= -3 and logs.max() <= -1
    assert abs(np.mean(logs < -2) - 0.5) < 0.1  # half the draws in each decade: uniform in log space


def test_params_are_routed_to_config_model_and_optimizer():
    e = apply_params(base(), {"lr": 0.02, "batch_size": 8, "weight_decay": 1e-3, "dropout": 0.1})
    assert e.train.lr == 0.02 and e.train.batch_size == 8 and e.dropout == 0.1
    assert e.train.optimizer_options == {"weight_decay": 1e-3}


def test_invalid_space():
    with pytest.raises(ValueError):
        LogUniform(0.1, 0.01)
    with pytest.raises(ValueError, match="Unknown search method"):
        search(base(), SPACE, method="bayes")


def test_random_search_ranks_by_validation_loss_and_serialises():
    result = search(base(), SPACE, method="random", n_trials=4, seed=0)
    assert len(result["trials"]) == 4
    losses = [t["val_loss"] for t in result["trials"]]
    assert losses == sorted(losses) and result["best"] == result["trials"][0]
    json.dumps(result)
    table = format_table(result)
    assert len(table.splitlines()) == 5 and "val_accuracy" in table


def test_trials_in_parallel_processes_match_in_process_results():
    serial = search(base(), SPACE, method="random", n_trials=2, n_jobs=1, seed=3)
    parallel = search(base(), SPACE, method="random", n_trials=2, n_jobs=2, seed=3)
    assert parallel["n_jobs"] == 2
    assert [t["val_loss"] for t in serial["trials"]] == [t["val_loss"] for t in parallel["trials"]]


@pytest.mark.skipif(not optuna_available(), reason="optuna not installed")
def test_tpe_search_with_optuna():
    result = search(base(), SPACE, method="tpe", n_trials=4, seed=0)
    assert len(result["trials"]) == 4 and result["method"] == "tpe"
    for t in result["trials"]:
        assert 1e-3 <= t["params"]["lr"] <= 1e-1 and t["params"]["batch_size"] in (16, 64)


def test_tpe_without_optuna_is_a_clear_error(monkeypatch):
    import fastopt.train.search as module
    monkeypatch.setattr(module, "optuna_available", lambda: False)
    with pytest.raises(ImportError, match="Optuna"):
        search(base(), SPACE, method="tpe", n_trials=1)
