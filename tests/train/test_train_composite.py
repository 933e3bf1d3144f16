"""The composite optimizers (lbfgs, muon, adafactor, sparse_adam) in the trainer and the CLI: they train the
digits MLP, schedules set their lr, clipping is applied, bad options fail before any data is loaded."""
import json
import math

import numpy as np
import pytest

import fastopt
from fastopt import schedules
from fastopt.cli import main
from fastopt.specs import COMPOSITE, all_optimizer_names
from fastopt.train.composite import CompositeOptimizer
from fastopt.train.data import load_dataset
from fastopt.train.experiment import RECOMMENDED, Experiment, recommended_config, recommended_lr
from fastopt.train.models import MLP
from fastopt.train.trainer import TrainConfig

COMPOSITES = list(COMPOSITE)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def run_digits(data, name, **overrides):
    overrides.setdefault("progress", False)
    overrides.setdefault("epochs", 3)
    config = recommended_config("digits", optimizer=name, **overrides)
    return Experiment(dataset="digits", hidden_sizes=(32,), train=config).run(data=data)


@pytest.mark.parametrize("name", COMPOSITES)
def test_each_composite_trains_the_digits_mlp(digits, name):
    result, _, _ = run_digits(digits, name)
    assert not result.diverged
    assert result.metrics["test"]["accuracy"] > 0.85  # chance is 0.1
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]


def test_sparse_adam_with_every_row_present_is_adam(digits):
    adam, _, _ = run_digits(digits, "adam", epochs=2)
    sparse, _, _ = run_digits(digits, "sparse_adam", epochs=2)
    np.testing.assert_allclose(sparse.history["train_loss"], adam.history["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(sparse.history["val_loss"], adam.history["val_loss"], rtol=1e-4)


@pytest.mark.parametrize("name", COMPOSITES)
def test_a_schedule_sets_the_composites_lr(digits, name):
    # cosine over the run: the lr recorded after epoch k is the schedule at the last step of that epoch
    result, _, _ = run_digits(digits, name, schedule="cosine", lr=0.02 if name != "lbfgs" else 1.0)
    n = len(digits.X_train)
    steps = 1 if name == "lbfgs" else math.ceil(n / result.config["batch_size"])
    total = 3 * steps
    expected = [schedules.cosine(result.config["lr"], total)(k * steps - 1) for k in (1, 2, 3)]
    assert result.history["lr"] == pytest.approx(expected, rel=1e-12)
    assert result.history["lr"][0] > result.history["lr"][1] > result.history["lr"][2]


def small_model(seed=0):
    return MLP(8, (6, 5), 3, seed=seed)


def flat_grad(model, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(model.params.shape) * scale).astype(model.params.dtype)


def test_reduce_lr_on_plateau_drives_muon_and_its_adamw_part():
    model = small_model()
    plateau = schedules.ReduceLROnPlateau(0.02, factor=0.5, patience=0)
    opt = CompositeOptimizer("muon", model, plateau, {"adamw_lr": 0.004}, base_lr=0.02)
    opt.step([flat_grad(model, 1)])
    assert opt.last_lr == pytest.approx([0.02, 0.004])
    plateau.update(1.0)
    plateau.update(2.0)  # no improvement, patience 0: halved
    opt.step([flat_grad(model, 2)])
    assert opt.last_lr == pytest.approx([0.01, 0.002])
    assert opt.count == 2


def test_muons_adamw_part_follows_a_warmup_relative_to_the_peak():
    model = small_model()
    schedule = schedules.warmup(schedules.cosine(0.02, 10), 5)
    opt = CompositeOptimizer("muon", model, schedule, {"adamw_lr": 0.004}, base_lr=0.02)
    seen = []
    for k in range(8):
        opt.step([flat_grad(model, k)])
        seen.append(opt.last_lr)
        assert opt.last_lr[0] == pytest.approx(schedule(k), rel=1e-12)
        assert opt.last_lr[1] == pytest.approx(0.004 * schedule(k) / 0.02, rel=1e-12)
    assert seen[0][0] < seen[4][0]  # warming up
    with pytest.raises(ValueError, match="base_lr"):
        CompositeOptimizer("muon", small_model(), schedule, {"adamw_lr": 0.004})


def test_a_bad_schedule_value_changes_nothing():
    model = small_model()
    opt = CompositeOptimizer("adafactor", model, lambda count: 0.01 if count == 0 else -1.0, base_lr=0.01)
    opt.step([flat_grad(model, 0)])
    before, groups = model.params.copy(), [dict(g) for g in opt.optimizers[0].param_groups]
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.step([flat_grad(model, 1)])
    assert model.params.tobytes() == before.tobytes() and opt.count == 1 and opt.last_lr == [0.01]
    assert [g["lr"] for g in opt.optimizers[0].param_groups] == [g["lr"] for g in groups]


@pytest.mark.parametrize("name", ["adafactor", "muon", "sparse_adam"])
def test_clip_grad_norm_is_applied_before_the_step(name):
    clipped, plain = small_model(), small_model()
    options = {"adamw_lr": 0.01} if name == "muon" else {}
    a = CompositeOptimizer(name, clipped, 0.01, options, clip_grad_norm=0.5)
    b = CompositeOptimizer(name, plain, 0.01, options)
    for seed in range(3):
        g = flat_grad(clipped, seed, scale=10.0)
        norm = float(np.linalg.norm(g.astype(np.float64)))
        assert norm > 5
        g_clipped = g.copy()
        a.step([g_clipped])
        assert float(np.linalg.norm(g_clipped.astype(np.float64))) == pytest.approx(0.5, rel=1e-5)
        b.step([(g * np.float32(0.5 / (norm + 1e-6))).astype(g.dtype)])
    np.testing.assert_allclose(clipped.params, plain.params, rtol=1e-5, atol=1e-7)
    assert not np.array_equal(clipped.params, small_model().params)


def test_muon_updates_hidden_matrices_and_adamw_the_rest():
    model = small_model()
    opt = CompositeOptimizer("muon", model, 0.02, {"adamw_lr": 0.001})
    muon, adamw = opt.optimizers
    assert isinstance(muon, fastopt.Muon) and isinstance(adamw, fastopt.AdamW)
    assert [p.shape for p in muon.params] == [(6, 8), (5, 6)]  # torch's (out, in), the head excluded
    assert [p.shape for p in adamw.param_groups[0]["params"]] == [(6,), (5,), (3,), (5, 3)]


@pytest.mark.parametrize("name, options, clip, fragment", [
    ("muon", {"ns_steps": 100}, None, "ns_steps"),
    ("muon", {"momentum": -1.0}, None, "momentum"),
    ("muon", {"adamw_lr": -1.0}, None, "adamw_lr"),
    ("muon", {"adjust_lr_fn": "bogus"}, None, "Adjust learning rate function bogus"),  # torch's words
    ("lbfgs", {"line_search_fn": "bogus"}, None, "line_search_fn"),
    ("lbfgs", {"max_iter": 0}, None, "max_iter"),
    ("lbfgs", {}, 1.0, "clip_grad_norm"),
    ("adafactor", {"d": 0.5}, None, "d"),
    ("adafactor", {"beta2_decay": 0.5}, None, "beta2_decay"),
    ("sparse_adam", {"eps": 0.0}, None, "epsilon"),
    ("sparse_adam", {"beta1": 1.0}, None, "beta"),
    ("adafactor", {"momentum": 0.9}, None, "momentum"),
])
def test_bad_options_fail_before_any_data_is_loaded(monkeypatch, name, options, clip, fragment):
    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded")
    monkeypatch.setattr(Experiment, "load_data", no_data)
    config = TrainConfig(optimizer=name, optimizer_options=options, clip_grad_norm=clip, progress=False)
    with pytest.raises((ValueError, TypeError), match=fragment):
        config.check()
    with pytest.raises((ValueError, TypeError), match=fragment):
        Experiment(dataset="digits", train=config).run()


def test_muon_refuses_a_model_without_a_hidden_layer():
    with pytest.raises(ValueError, match="hidden layer"):
        Experiment(dataset="wine", train=TrainConfig(optimizer="muon")).check()


def test_default_learning_rates():
    for dataset in RECOMMENDED:
        assert recommended_lr(dataset, "lbfgs") == 1.0  # its own: the line search's first trial step
        for name in ("adafactor", "muon", "sparse_adam"):
            assert 0 < recommended_lr(dataset, name) < 1, (dataset, name)
    assert recommended_lr("digits", "sparse_adam") == recommended_lr("digits", "adam")
    config = recommended_config("digits", optimizer="muon")
    assert config.optimizer_options["adamw_lr"] == recommended_lr("digits", "adam")
    assert config.lr == recommended_lr("digits", "muon")


# ------------------------------------------------------------------------------------------ CLI

def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_runs_every_composite(capsys):
    code, out, err = run_cli(capsys, "compare", "--optimizers", "adam,adafactor,muon,lbfgs,sparse_adam",
                             "--epochs", "2", "--no-plot", "--json", "--hidden", "32")
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert list(runs) == ["adam", "adafactor", "muon", "lbfgs", "sparse_adam"]
    for name, run in runs.items():
        assert run["status"] == "ok" and run["result"]["metrics"]["test"]["accuracy"] > 0.6, name
        assert run["lr"] == recommended_lr("digits", name)
        assert run["options"] == run["result"]["config"]["optimizer_options"], name  # the options it ran with
    assert runs["muon"]["options"]["adamw_lr"] == recommended_lr("digits", "adam")


def test_optimizer_choices_are_every_name(capsys):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    choices = "{" + ",".join(all_optimizer_names()) + "}"
    assert f"--optimizer {choices}" in text


def test_opt_values_of_composite_kinds(capsys):
    code, out, err = run_cli(capsys, "train", "-o", "lbfgs", "--opt", "max_iter=3", "--opt", "line_search_fn=none",
                             "--opt", "max_eval=none", "--epochs", "1", "--json", "--no-plot", "--hidden", "16")
    assert code == 0, err
    options = json.loads(out)["experiment"]["train"]["optimizer_options"]
    assert options == {"max_iter": 3, "line_search_fn": None, "max_eval": None}
    code, out, err = run_cli(capsys, "train", "-o", "muon", "--opt", "ns_steps=3", "--opt", "adjust_lr_fn=original",
                             "--momentum", "0.9", "--epochs", "1", "--json", "--no-plot", "--hidden", "16")
    assert code == 0, err
    options = json.loads(out)["experiment"]["train"]["optimizer_options"]
    assert options["ns_steps"] == 3 and options["adjust_lr_fn"] == "original" and options["momentum"] == 0.9


@pytest.mark.parametrize("argv, fragments", [
    (("-o", "muon", "--opt", "ns_coefficients=1,2,3"), ("--opt ns_coefficients=1,2,3", "tuple")),
    (("-o", "adafactor", "--opt", "eps=1e-3"), ("--opt eps=1e-3", "tuple")),
    (("-o", "lbfgs", "--opt", "max_iter=2.5"), ("--opt max_iter=2.5", "integer")),
    (("-o", "lbfgs", "--opt", "max_iter=0"), ("--opt max_iter=0", "max_iter")),
    (("-o", "muon", "--opt", "ns_steps=-1"), ("--opt ns_steps=-1", "ns_steps")),
    (("-o", "lbfgs", "--clip-grad-norm", "1"), ("clip_grad_norm",)),
    (("-o", "sparse_adam", "--momentum", "0.9"), ("--momentum", "no hyperparameter")),
    (("-o", "muon", "-d", "wine"), ("hidden layer",)),
])
def test_composite_usage_errors_name_the_option(capsys, argv, fragments):
    code, out, err = run_cli(capsys, "train", *argv, "--no-plot", "--epochs", "1")
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_demo_lists_every_optimizer(capsys):
    from fastopt import demo
    demo.list_optimizers()
    out = capsys.readouterr().out
    for name in all_optimizer_names():
        assert f" {name} " in f" {out} ".replace("\n", " "), name
    assert "nan" not in out
