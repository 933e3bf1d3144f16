"""CLI smoke runs with tiny epochs: train, compare, search; --json; clear errors."""
import json

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


def test_user_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "-d", "mnist", "--data-path", str(tmp_path), "--no-plot")
    assert code == 2 and "train-images-idx3-ubyte" in err
    code, _, err = run_cli(capsys, "train", "-d", "wine", "-m", "linear", "--no-plot")
    assert code == 2 and "regression" in err
    code, _, err = run_cli(capsys, "train", "-d", "wine", "-o", "sgd", "--opt", "beta1=0.9", "--no-plot")
    assert code == 2 and "no hyperparameter" in err
