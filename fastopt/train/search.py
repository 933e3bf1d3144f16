"""Hyperparameter search over a declared space: grid, random, or Optuna's TPE sampler (when Optuna is
installed), trials in parallel processes, results as a table and JSON.

    space = {"lr": LogUniform(1e-4, 1e-1), "batch_size": Choice([16, 32, 64]),
             "weight_decay": Choice([0.0, 1e-4, 1e-3])}
    result = search(Experiment(dataset="digits"), space, method="random", n_trials=20, n_jobs=2)

A parameter name is routed to where it belongs: TrainConfig fields (lr, batch_size, epochs, ...), model
fields of Experiment (dropout, l2, hidden_sizes, ...), else an optimizer hyperparameter (weight_decay,
momentum, beta1, ...). Trials are ranked by validation loss: continuous, defined for every task, and
not saturated the way accuracy is on small validation sets. The test split is reported, never used.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from fastopt.train.experiment import Experiment
from fastopt.train.metrics import headline_metric
from fastopt.train.trainer import TrainConfig

METHODS = ("grid", "random", "tpe")


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def __post_init__(self):
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform needs 0 < low < high, got ({self.low}, {self.high})")

    def sample(self, rng):
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def grid(self, points):
        return [float(v) for v in np.geomspace(self.low, self.high, points)]


@dataclass(frozen=True)
class Choice:
    values: tuple

    def __post_init__(self):
        if len(self.values) == 0:
            raise ValueError("Choice needs at least one value")

    def sample(self, rng):
        return self.values[int(rng.integers(len(self.values)))]

    def grid(self, points):
        return list(self.values)


def default_space():
    return {"lr": LogUniform(1e-4, 1e-1), "batch_size": Choice((16, 32, 64, 128)),
            "weight_decay": Choice((0.0, 1e-4, 1e-3))}


def grid_trials(space, points=3):
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n].grid(points) for n in names))]


def random_trials(space, n_trials, seed=0):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))
    return [{name: dist.sample(rng) for name, dist in space.items()} for _ in range(n_trials)]


def apply_params(base: Experiment, params: dict) -> Experiment:
    """The experiment with `params` routed to the training config, the model, or the optimizer."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(Experiment)} - {"train"}
    options = dict(base.train.optimizer_options)
    changes = {}
    for name, value in params.items():
        if name in train_fields or name in model_fields:
            changes[name] = value
        else:
            options[name] = value
    return base.replace(optimizer_options=options, **changes)


def _run_trial(base: Experiment, params: dict, number: int) -> dict:
    """One trial (runs in a worker process): train, return plain numbers. "status" is "ok", "diverged"
    (the loss became NaN/Inf: objective inf, metrics None, "divergence" says where) or "error" (an
    invalid combination: objective inf, "error" says why)."""
    from fastopt.train.trainer import describe_divergence
    experiment = apply_params(base, params)
    start = time.perf_counter()
    try:
        result, _, data = experiment.run()
    except (ValueError, TypeError) as e:  # e.g. an invalid combination: report, don't abort the search
        return {"number": number, "params": params, "status": "error", "objective": math.inf, "error": str(e),
                "seconds": time.perf_counter() - start}
    metric, _ = headline_metric(data.task)
    trial = {"number": number, "params": params, "status": "diverged" if result.diverged else "ok",
             "objective": math.inf, "val_loss": None, f"val_{metric}": None, f"test_{metric}": None,
             "test_loss": None, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
             "diverged": result.diverged, "seconds": time.perf_counter() - start}
    if result.diverged:
        trial["divergence"] = result.divergence
        trial["error"] = "diverged: " + describe_divergence(result.divergence)
        return trial
    val_loss = result.metrics["val"]["loss"]
    trial.update({"objective": val_loss, "val_loss": val_loss, f"val_{metric}": result.metrics["val"][metric],
                  f"test_{metric}": result.metrics["test"][metric], "test_loss": result.metrics["test"]["loss"]})
    return trial


def _limit_threads_in_worker():
    # n_jobs processes on a few cores: one thread each, or BLAS and OpenMP oversubscribe the machine
    import fastopt
    fastopt.set_num_threads(1)


class _Runner:
    """Runs batches of trials in-process (n_jobs=1) or in a pool of spawned processes. Spawn, not fork:
    forking a process whose OpenMP runtime already started threads can deadlock the child."""

    def __init__(self, n_jobs):
        self.n_jobs = max(1, int(n_jobs))
        self.pool = None
        if self.n_jobs > 1:
            import multiprocessing
            saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
            os.environ.update({k: "1" for k in saved})  # inherited by the workers at spawn
            try:
                self.pool = ProcessPoolExecutor(self.n_jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_limit_threads_in_worker)
                # start every worker now, while the variables are set
                list(self.pool.map(_noop, range(self.n_jobs)))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def run(self, base, batch):
        """batch: list of (number, params) -> list of trial dicts, in order."""
        if self.pool is None:
            return [_run_trial(base, params, number) for number, params in batch]
        futures = [self.pool.submit(_run_trial, base, params, number) for number, params in batch]
        return [f.result() for f in futures]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _noop(_):
    return None


def optuna_available() -> bool:
    try:
        import optuna  # noqa: F401
        return True
    except ImportError:
        return False


def _tpe(base, space, n_trials, seed, runner, on_trial):
    """Optuna's TPE sampler through ask/tell: n_jobs trials are asked, run in parallel, then told."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    trials, number = [], 0
    while number < n_trials:
        asked = []
        for _ in range(min(runner.n_jobs, n_trials - number)):
            trial = study.ask()
            params = {}
            for name, dist in space.items():
                if isinstance(dist, LogUniform):
                    params[name] = trial.suggest_float(name, dist.low, dist.high, log=True)
                else:
                    params[name] = trial.suggest_categorical(name, list(dist.values))
            asked.append((trial, (number, params)))
            number += 1
        for (trial, _), outcome in zip(asked, runner.run(base, [job for _, job in asked])):
            objective = outcome["objective"]
            if math.isfinite(objective):
                study.tell(trial, objective)
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            trials.append(outcome)
            on_trial(outcome)
    return trials


def search(base: Experiment, space=None, *, method="random", n_trials=20, n_jobs=1, seed=0, grid_points=3,
           on_trial=None) -> dict:
    """Run the search; returns {"method", "space", "base", "trials" (ranked, best first), "best", "seconds"}."""
    space = default_space() if space is None else space
    if method not in METHODS:
        raise ValueError(f"Unknown search method {method!r}; use one of {', '.join(METHODS)}")
    for name, value, low in (("n_trials", n_trials, 1), ("n_jobs", n_jobs, 1), ("grid_points", grid_points, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")
    if not space:
        raise ValueError("the search space is empty")
    base.check()
    if method == "tpe" and not optuna_available():
        raise ImportError("method 'tpe' needs Optuna: pip install optuna (or use --method random)")
    base = base.replace(progress=False)
    on_trial = on_trial or (lambda trial: None)
    start = time.perf_counter()
    candidates = None
    if method != "tpe":
        candidates = grid_trials(space, grid_points) if method == "grid" else random_trials(space, n_trials, seed)
    # no more processes than trials
    runner = _Runner(min(n_jobs, n_trials if candidates is None else max(1, len(candidates))))
    try:
        if method == "tpe":
            trials = _tpe(base, space, n_trials, seed, runner, on_trial)
        else:
            trials = []
            jobs = list(enumerate(candidates))
            for i in range(0, len(jobs), runner.n_jobs):
                for outcome in runner.run(base, jobs[i:i + runner.n_jobs]):
                    trials.append(outcome)
                    on_trial(outcome)
    finally:
        runner.close()
    ranked = sorted(trials, key=lambda t: (t["objective"], t["number"]))
    finished = [t for t in ranked if t["status"] == "ok"]
    return {
        "method": method, "n_jobs": runner.n_jobs, "seed": seed,
        "space": {name: dataclasses.asdict(dist) | {"kind": type(dist).__name__} for name, dist in space.items()},
        "base": base.to_dict(), "objective": "validation loss (lower is better)",
        "trials": ranked, "best": finished[0] if finished else None, "seconds": time.perf_counter() - start,
    }


def format_table(result: dict, limit: int | None = None) -> str:
    """The ranked trials as a text table."""
    trials = result["trials"][:limit] if limit else result["trials"]
    if not trials:
        return "(no trials)"
    names = list(result["space"])
    keyed = [t for t in trials if t.get("status", "ok") == "ok"] or trials
    metric_keys = [k for k in keyed[0] if k.startswith(("val_", "test_")) and k not in ("val_loss", "test_loss")]
    header = ["#", *names, "val_loss", *metric_keys, "epochs", "seconds"]
    rows = []
    for t in trials:
        p = t["params"]
        cells = [str(t["number"])] + [_fmt(p[n]) for n in names]
        if t.get("status", "ok") != "ok" or "error" in t:
            cells += [_failure(t)] + [""] * (len(header) - len(cells) - 1)
        else:
            cells += [_fmt(t["val_loss"])] + [_fmt(t[k]) for k in metric_keys] + [str(t["epochs_run"]),
                                                                                 f"{t['seconds']:.2f}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _failure(trial) -> str:
    d = trial.get("divergence")
    if d is not None:
        return f"diverged (epoch {d['epoch']}" + (f", step {d['step']})" if d["step"] is not None else ")")
    text = "error: " + trial.get("error", "")
    return text if len(text) <= 60 else text[:57] + "..."


def _fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
