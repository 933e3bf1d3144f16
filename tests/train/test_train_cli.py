"""CLI smoke runs with tiny epochs: train, compare, search; --json; clear errors."""
import json

import numpy as np
import pytest

from fastopt.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_default_is_the_digits_mlp(capsys, tmp_path):
    plot = tmp_path / "curves.png"
    code, out, _ = run_cli(capsys, "train", "--epochs", "2", "--no-progress", "--plot", str(plot))
    assert code == 0
    assert "MLP(64-128-10" in out and "accuracy" in out and f"plot: {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_json_output_and_file(capsys, tmp_path):
    out_file = tmp_path / "run.json"
    code, out, err = run_cli(capsys, "train", "-d", "breast_cancer", "--epochs", "3", "--json", "--no-plot",
                             "--out", str(out_file), "-o", "sgd", "--lr", "0.1", "--momentum", "0.9",
                             "--schedule", "cosine", "--clip-grad-norm", "5", "--patience", "2")
    assert code == 0 and err == ""  # --json implies no progress bar
    payload = json.loads(out)
    assert payload["experiment"]["model"] == "logistic"
    assert payload["experiment"]["train"]["optimizer_options"] == {"momentum": 0.9}
    assert len(payload["result"]["history"]["train_loss"]) == payload["result"]["epochs_run"] <= 3
    assert json.loads(out_file.read_text())["result"]["metrics"]["test"]["accuracy"] > 0.8


def test_train_linear_prints_raw_coefficients(capsys):
    code, out, _ = run_cli(capsys, "train", "-d", "linear", "--epochs", "5", "--no-progress", "--no-plot")
    assert code == 0 and "coefficients on the raw data: w = [" in out


def test_same_seed_same_history_through_the_cli(capsys):
    args = ("train", "-d", "wine", "-m", "mlp", "--hidden", "8,8", "--dropout", "0.1", "--epochs", "3", "--json",
            "--no-plot", "--seed", "7")
    first = json.loads(run_cli(capsys, *args)[1])["result"]["history"]
    second = json.loads(run_cli(capsys, *args)[1])["result"]["history"]
    assert first["train_loss"] == second["train_loss"] and first["val_loss"] == second["val_loss"]


def test_compare_writes_table_and_png(capsys, tmp_path):
    plot = tmp_path / "compare.png"
    code, out, _ = run_cli(capsys, "compare", "-d", "wine", "--optimizers", "sgd,adam,lion", "--epochs", "2",
                           "--no-progress", "--plot", str(plot))
    assert code == 0
    for name in ("sgd", "adam", "lion"):
        assert f"\n{name:>10} " in out
    assert plot.stat().st_size > 10_000


def test_compare_json_runs_share_initial_conditions(capsys):
    code, out, _ = run_cli(capsys, "compare", "-d", "wine", "--optimizers", "adam,adamw", "--epochs", "1",
                           "--json", "--no-plot", "--lr", "0.01")
    runs = json.loads(out)["runs"]
    assert set(runs) == {"adam", "adamw"} and runs["adam"]["lr"] == runs["adamw"]["lr"] == 0.01


def test_search_random_in_process(capsys, tmp_path):
    out_file = tmp_path / "search.json"
    code, out, _ = run_cli(capsys, "search", "-d", "wine", "--epochs", "2", "--trials", "3", "--no-progress",
                           "--out", str(out_file))
    assert code == 0 and "best:" in out
    result = json.loads(out_file.read_text())
    assert len(result["trials"]) == 3 and result["method"] == "random"
    objectives = [t["objective"] for t in result["trials"]]
    assert objectives == sorted(objectives)


def test_gpu_request_fails_clearly_without_a_gpu(capsys):
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present")
    except Exception:
        pass
    code, _, err = run_cli(capsys, "train", "--device", "gpu", "--epochs", "1", "--no-plot")
    assert code == 2 and "--device gpu" in err


@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_default_plot_without_matplotlib_says_how_to_go_without_it(capsys, monkeypatch, tmp_path, command):
    """The plot is on by default: without the [train] extra's matplotlib the error names the way out."""
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli(capsys, command, "-d", "linear", "--epochs", "1")
    assert code == 2 and "matplotlib" in err and "--no-plot" in err, err
    assert not os.listdir(tmp_path)


def test_user_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "-d", "mnist", "--data-path", str(tmp_path), "--no-plot")
    assert code == 2 and "train-images-idx3-ubyte" in err
    code, _, err = run_cli(capsys, "train", "-d", "wine", "-m", "linear", "--no-plot")
    assert code == 2 and "regression" in err
    code, _, err = run_cli(capsys, "train", "-d", "wine", "-o", "sgd", "--opt", "beta1=0.9", "--no-plot")
    assert code == 2 and "no hyperparameter" in err


# ------------------------------------------------------------------------------------------ hardening (issue 9)

import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from fastopt.specs import REGISTRY  # noqa: E402
from fastopt.train.experiment import RECOMMENDED, recommended_lr  # noqa: E402


def strict_loads(text):
    def reject(constant):
        raise AssertionError(f"non-strict JSON: {constant}")
    return json.loads(text, parse_constant=reject)


def assert_usage_error(code, out, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and out == ""  # nothing ran
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_negative_lr_names_the_option_not_the_schedule(capsys):
    code, out, err = run_cli(capsys, "train", "--lr", "-0.1", "--no-plot")
    assert_usage_error(code, out, err, "--lr: Invalid learning rate: -0.1")
    assert "init_value" not in err


@pytest.mark.parametrize("argv, fragments", [
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--lr", "fast"], ["--lr", "'fast'"]),
    (["--epochs", "0"], ["--epochs", "Invalid number of epochs: 0"]),
    (["--epochs", "-5"], ["--epochs", "-5"]),
    (["--epochs", "2.5"], ["--epochs", "'2.5'"]),
    (["--batch-size", "0"], ["--batch-size", "Invalid batch size: 0"]),
    (["--momentum", "-1", "-o", "sgd"], ["--momentum", "-1"]),
    (["--weight-decay", "-0.01"], ["--weight-decay", "-0.01"]),
    (["--betas", "0.9"], ["--betas", "'0.9'"]),
    (["--betas", "0.9,1.0"], ["--betas", "Invalid beta: 1.0"]),
    (["--clip-grad-norm", "0"], ["--clip-grad-norm", "0"]),
    (["--patience", "-1"], ["--patience", "-1"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--hidden", "64,0"], ["--hidden", "Invalid hidden size: 0"]),
    (["--hidden", ""], ["--hidden"]),
    (["--hidden", "10,,20"], ["--hidden", "'10,,20' (an empty value between commas)"]),  # was read as 10,20
    (["--out", ""], ["--out: empty path"]),  # was ignored
    (["--dropout", "1"], ["--dropout", "Invalid dropout: 1"]),
    (["--l2", "-1"], ["--l2", "-1"]),
    (["--l1", "nan"], ["--l1", "nan"]),
    (["--opt", "eps"], ["--opt", "KEY=VALUE", "'eps'"]),
    (["--opt", "eps=-1"], ["--opt eps=-1: Invalid", "-1"]),
    (["--opt", "eps=abc"], ["--opt eps=abc", "'abc'"]),
    (["--opt", "amsgrad=maybe"], ["--opt amsgrad=maybe", "true or false"]),
    (["--opt", "lr=0.1"], ["--opt lr=0.1", "use --lr"]),
    (["-o", "adam", "--momentum", "0.9"], ["--momentum", "adam has no hyperparameter 'momentum'"]),
    (["-o", "sgd", "--opt", "nesterov=true"], ["-o sgd with --opt nesterov=true", "Nesterov"]),
    (["-d", "iris"], ["--dataset", "'iris'"]),
    (["-m", "cnn"], ["--model", "'cnn'"]),
    (["-o", "adamax2"], ["--optimizer", "'adamax2'"]),
    (["--schedule", "sawtooth"], ["--schedule", "'sawtooth'"]),
    (["--activation", "gelu"], ["--activation", "'gelu'"]),
    (["--dtype", "float16"], ["--dtype", "'float16'"]),
    (["-d", "wine", "-m", "linear"], ["linear model is for regression", "wine"]),
    (["-d", "diabetes", "-m", "logistic"], ["logistic regression is for classification"]),
    (["--data-path", "/tmp"], ["--data-path", "mnist"]),
    (["--plot", "curves.bmpx"], ["--plot", "unsupported file type .bmpx"]),
    (["--plot", "curves"], ["--plot", "no file extension"]),
])
def test_train_bad_options_are_usage_errors(capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--no-progress", *argv)
    assert_usage_error(code, out, err, *fragments)
    assert os.listdir(tmp_path) == []  # no plot, no JSON, no directory


@pytest.mark.parametrize("argv, fragments", [
    (["--trials", "0"], ["--trials", "Invalid number of trials: 0"]),
    (["--trials", "-2"], ["--trials", "-2"]),
    (["--jobs", "0"], ["--jobs", "0"]),
    (["--lr-range", "0,0.1"], ["--lr-range", "Invalid learning rate: 0"]),
    (["--lr-range", "0.1,0.01"], ["--lr-range", "low < high"]),
    (["--lr-range", "0.1"], ["--lr-range", "'0.1'"]),
    (["--batch-sizes", "16,0"], ["--batch-sizes", "Invalid batch size: 0"]),
    (["--weight-decays", "-1"], ["--weight-decays", "-1"]),
    (["--grid-points", "0"], ["--grid-points", "0"]),
    (["--top", "0"], ["--top", "0"]),
    (["--method", "bayes"], ["--method", "'bayes'"]),
    (["--lr", "0.1"], ["--lr", "--lr-range"]),
    (["--batch-size", "8"], ["--batch-size", "--batch-sizes"]),
])
def test_search_bad_options_are_usage_errors(capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "search", "-d", "wine", "--epochs", "1", *argv)
    assert_usage_error(code, out, err, *fragments)
    assert os.listdir(tmp_path) == []  # no (empty) result file


@pytest.mark.parametrize("argv, fragments", [
    (["--optimizers", "sgd,foo"], ["--optimizers", "'foo'"]),
    (["--optimizers", ""], ["--optimizers"]),
    (["--optimizers", "adam,lion", "--opt", "nesterov=true"], ["--opt nesterov=true", "none of adam, lion"]),
    (["--optimizers", "adam,sgd", "--opt", "nesterov=true"], [": error: sgd with --opt nesterov=true"]),
])
def test_compare_bad_options_are_usage_errors(capsys, tmp_path, monkeypatch, argv, fragments):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "compare", "-d", "wine", "--epochs", "1", *argv)
    assert_usage_error(code, out, err, *fragments)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["train", "compare"])
def test_plot_in_a_missing_directory_fails_up_front_and_creates_nothing(capsys, tmp_path, command):
    plot = tmp_path / "missing" / "x.png"
    code, out, err = run_cli(capsys, command, "-d", "wine", "--epochs", "1", "--no-progress", "--plot", str(plot))
    assert_usage_error(code, out, err, "--plot", str(tmp_path / "missing"), "does not exist")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", ["train", "compare", "search"])
def test_out_in_a_missing_directory_fails_up_front(capsys, tmp_path, command):
    target = tmp_path / "missing" / "run.json"
    code, out, err = run_cli(capsys, command, "-d", "wine", "--epochs", "1", "--no-progress", "--no-plot"
                             if command != "search" else "--trials=1", "--out", str(target))
    assert_usage_error(code, out, err, "--out", "does not exist")
    assert not (tmp_path / "missing").exists()


def test_search_default_result_file_is_checked_before_running(capsys, tmp_path, monkeypatch):
    (tmp_path / "fastopt-search.json").mkdir()  # the default --out is a directory: cannot be written
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "search", "-d", "wine", "--epochs", "1", "--trials", "1")
    assert_usage_error(code, out, err, "--out fastopt-search.json", "is a directory")


def test_diverging_training_stops_with_a_clear_message(capsys, tmp_path):
    out_file = tmp_path / "run.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(capsys, "train", "-d", "diabetes", "-o", "sgd", "--lr", "100", "--no-progress",
                                 "--plot", str(tmp_path / "x.png"), "--out", str(out_file))
    assert code == 1
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]  # no overflow warning flood
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(r"training diverged: the training loss became (inf|nan) at epoch 1, step \d+ of \d+", err), err
    assert "sgd, lr=100" in err and "lower --lr" in err
    assert not re.search(r"\d{12,}", out + err)  # no 60-digit numbers
    payload = strict_loads(out_file.read_text())
    assert payload["status"] == "diverged" and payload["plot"] is None
    result = payload["result"]
    assert result["diverged"] and result["metrics"] is None and result["divergence"]["epoch"] == 1
    assert not (tmp_path / "x.png").exists()  # no plot of a diverged run


def test_diverging_training_json_is_strict(capsys):
    code, out, err = run_cli(capsys, "train", "-d", "diabetes", "-o", "sgd", "--lr", "100", "--json", "--no-plot")
    assert code == 1 and "diverged" in err
    payload = strict_loads(out)
    assert payload["status"] == "diverged" and payload["result"]["divergence"]["loss"] == "training"


def test_diverging_training_as_a_subprocess_prints_no_warnings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastopt", "train", "-d", "diabetes", "-o", "sgd", "--lr", "100",
                             "--no-plot", "--no-progress"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "diverged" in result.stderr
    assert os.listdir(tmp_path) == []


def test_compare_reports_a_diverged_optimizer_and_fails(capsys, tmp_path):
    out_file = tmp_path / "cmp.json"
    code, out, err = run_cli(capsys, "compare", "-d", "diabetes", "--optimizers", "sgd,adam", "--lr", "100",
                             "--epochs", "2", "--no-progress", "--plot", str(tmp_path / "c.png"),
                             "--out", str(out_file))
    assert code == 1 and "Traceback" not in err
    assert "sgd: the training loss became" in err
    assert re.search(r"\n\s+sgd\s+100\s+32\s+diverged", out)
    payload = strict_loads(out_file.read_text())
    assert payload["status"] == "diverged" and payload["runs"]["sgd"]["status"] == "diverged"


def test_search_with_diverging_trials_writes_strict_json(capsys, tmp_path):
    out_file = tmp_path / "search.json"
    code, out, err = run_cli(capsys, "search", "-d", "diabetes", "-o", "sgd", "--epochs", "2", "--trials", "2",
                             "--lr-range", "50,100", "--no-progress", "--out", str(out_file))
    assert code == 1 and "no trial finished" in err and "Traceback" not in err
    assert "diverged (epoch" in out
    result = strict_loads(out_file.read_text())
    assert result["best"] is None and result["status"] == "failed"
    assert all(t["status"] == "diverged" and t["objective"] is None for t in result["trials"])


def test_search_trials_must_be_positive_and_results_are_strict_json(capsys, tmp_path):
    out_file = tmp_path / "search.json"
    code, out, err = run_cli(capsys, "search", "-d", "wine", "--epochs", "1", "--trials", "2", "--json",
                             "--out", str(out_file))
    assert code == 0
    assert strict_loads(out) == strict_loads(out_file.read_text())
    assert len(strict_loads(out)["trials"]) == 2


def test_lion_gets_a_smaller_default_lr_than_adam(capsys):
    code, out, _ = run_cli(capsys, "train", "-d", "wine", "-o", "lion", "--epochs", "2", "--json", "--no-plot")
    lion_lr = strict_loads(out)["experiment"]["train"]["lr"]
    code, out, _ = run_cli(capsys, "train", "-d", "wine", "-o", "adam", "--epochs", "2", "--json", "--no-plot")
    adam_lr = strict_loads(out)["experiment"]["train"]["lr"]
    assert adam_lr / 10 <= lion_lr <= adam_lr / 3
    for dataset in RECOMMENDED:  # the Lion paper: 3-10x smaller than AdamW's
        adam = recommended_lr(dataset, "adam")
        assert adam / 10 <= recommended_lr(dataset, "lion") <= adam / 3


def test_compare_uses_each_optimizers_recommended_lr(capsys):
    code, out, _ = run_cli(capsys, "compare", "-d", "wine", "--optimizers", "adam,lion,sgd", "--epochs", "1",
                           "--json", "--no-plot")
    runs = strict_loads(out)["runs"]
    assert code == 0
    assert {name: run["lr"] for name, run in runs.items()} == {n: recommended_lr("wine", n) for n in runs}


def test_every_registry_optimizer_has_a_positive_default_lr():
    # below 1, except where the optimizer's own default lr is a scale of about 1 (Adadelta: torch's default
    # 1.0, tuned to 10 on digits): there below 100x that default
    from fastopt.specs import REQUIRED
    for dataset in RECOMMENDED:
        for name, spec in REGISTRY.items():
            lr = recommended_lr(dataset, name)
            default = spec.defaults["lr"]
            bound = 1.0 if default is REQUIRED else max(1.0, 100 * default)
            assert lr is not None and 0 < lr < bound, (dataset, name, lr)


def test_train_prints_numbers_with_sensible_precision(capsys):
    code, out, _ = run_cli(capsys, "train", "-d", "diabetes", "--epochs", "3", "--no-progress", "--no-plot")
    assert code == 0 and "mse" in out
    assert not re.search(r"\d{12,}", out)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_out_on_the_plots_file_is_refused_up_front(capsys, tmp_path, monkeypatch, command):
    """--out naming the plot's file (the default plot name, or the same --plot) wrote the JSON over the plot
    after both had been reported written; now a usage error before anything runs."""
    monkeypatch.chdir(tmp_path)
    default = f"fastopt-{command}.png"
    for extra in ([], ["--plot", str(tmp_path / default)]):
        code, out, err = run_cli(capsys, command, "-d", "wine", "--epochs", "1", "--no-progress", "--out", default,
                                 *extra)
        assert_usage_error(code, out, err, f"--out {default} is the plot's file too")
        assert not (tmp_path / default).exists()


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, unbuffered):
    """`fastopt info | head -1`: the pipe closes under our output; exit 141 (as a tool SIGPIPE ends), no
    BrokenPipeError traceback, also when the output is still in stdout's buffer when the command is done."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "fastopt", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_search_help_offers_what_search_takes(capsys):
    """search refuses --lr, --batch-size and --weight-decay (it samples them from its ranges): its help no longer
    offers them, and says where the result goes without --out."""
    code, out, err = run_cli(capsys, "search", "--help")
    assert code == 0
    for refused in ("--lr ", "--batch-size ", "--weight-decay "):
        assert refused not in out, refused
    assert "--lr-range" in out and "--batch-sizes" in out and "--weight-decays" in out
    assert "default fastopt-search.json" in " ".join(out.split()).replace("- ", "-")  # (argparse wraps at a hyphen)


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("argv, words", [
    (["--opt", "weight_decay=0.1", "--weight-decay", "0.2"], "--weight-decay and --opt weight_decay=0.1 both set"),
    (["--betas", "0.9,0.99", "--opt", "beta1=0.5"], "--betas and --opt beta1=0.5 both set beta1"),
    (["--opt", "eps=1e-6", "--opt", "eps=1e-7"], "--opt eps=1e-7 and --opt eps=1e-6 both set eps"),
])
def test_one_hyperparameter_set_twice_is_a_usage_error(capsys, command, argv, words):
    """Two options for one hyperparameter were resolved silently (the dedicated option won, whatever the order)."""
    code, out, err = run_cli(capsys, command, "-d", "wine", "--epochs", "1", "--no-progress", "--no-plot", *argv)
    assert_usage_error(code, out, err, words)


def test_train_reports_lbfgs_batch_as_full(capsys):
    """L-BFGS trains on the whole training set: train's header says "batch: full", as compare's table does."""
    code, out, err = run_cli(capsys, "train", "-d", "wine", "-o", "lbfgs", "--epochs", "1", "--no-progress",
                             "--no-plot")
    assert code == 0, err
    assert "batch: full" in out


@pytest.mark.parametrize("n", [3, 12, 27])
def test_every_run_of_a_plot_has_its_own_look(tmp_path, monkeypatch, n):
    """fastopt compare runs every optimizer: no two curves of the plot share colour and marker."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    from fastopt.train.plots import plot_histories
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), real_savefig(fig, *a, **k))[1])
    rng = np.random.default_rng()
    history = {"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "val_accuracy": [0.5, 0.7]}
    histories = {f"run{i}": {k: list(rng.permutation(v)) if k != "epoch" else v for k, v in history.items()}
                 for i in range(n)}
    path = str(tmp_path / "runs.png")
    assert plot_histories(histories, path) == path and (tmp_path / "runs.png").stat().st_size > 0
    ax_loss, ax_metric = figures[0].axes
    for ax, per_run in ((ax_metric, 1), (ax_loss, 2)):
        lines = ax.get_lines()
        assert len(lines) == per_run * n
        looks = [(matplotlib.colors.to_hex(line.get_color()), line.get_marker()) for line in lines[::per_run]]
        assert len(set(looks)) == n, looks
