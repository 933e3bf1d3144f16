"""`fastopt train | compare | search`: added to fastopt's command line by fastopt/cli.py.

    fastopt train                              # MLP 64-128-10 on digits with Adam: metrics + a PNG
    fastopt train --dataset breast_cancer      # logistic regression; diabetes/linear: linear regression
    fastopt compare --optimizers sgd,adam,lion --epochs 10
    fastopt search --method random --trials 20 --jobs 2
"""
from __future__ import annotations

import json
import sys

from fastopt.specs import REGISTRY
from fastopt.train.arrays import GPUUnavailableError, device_module
from fastopt.train.data import DATASETS
from fastopt.train.experiment import DTYPES, MODELS, Experiment, recommended_config
from fastopt.train.metrics import headline_metric
from fastopt.train.models import ACTIVATIONS, INITS
from fastopt.train.trainer import SCHEDULES

DEFAULT_COMPARE = "sgd,rmsprop,adam,adamw,lion"


# ------------------------------------------------------------------------------------------ options

def _floats(text):
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text):
    return tuple(int(v) for v in text.split(",") if v.strip())


def _value(text):
    """KEY=VALUE values: bools, then numbers, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _add_common(p, *, optimizer=True):
    data = p.add_argument_group("data and model")
    data.add_argument("--dataset", "-d", choices=DATASETS, default="digits")
    data.add_argument("--data-path", default=None, help="mnist: directory with the four IDX files (or .gz)")
    data.add_argument("--model", "-m", choices=MODELS, default="auto",
                      help="auto: linear for linear/diabetes, logistic for breast_cancer/wine, mlp for images")
    data.add_argument("--hidden", type=_ints, default=(128,), help="MLP hidden sizes, comma-separated (128)")
    data.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    data.add_argument("--dropout", type=float, default=0.0)
    data.add_argument("--init", choices=INITS, default="auto", help="auto: He for relu, Xavier otherwise")
    data.add_argument("--l1", type=float, default=0.0, help="L1 penalty on the weights")
    data.add_argument("--l2", type=float, default=0.0, help="L2 penalty on the weights")
    data.add_argument("--dtype", choices=list(DTYPES), default="float32")
    data.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: CuPy arrays on a CUDA GPU")
    t = p.add_argument_group("training (unset: the data set's recommended values)")
    if optimizer:
        t.add_argument("--optimizer", "-o", choices=list(REGISTRY), default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--momentum", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--betas", type=_floats, default=None, help="beta1,beta2")
    t.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other optimizer hyperparameter (repeatable), e.g. --opt nesterov=true")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--schedule", choices=SCHEDULES, default=None)
    t.add_argument("--clip-grad-norm", type=float, default=None)
    t.add_argument("--patience", type=int, default=None, help="early stopping after this many epochs without "
                                                              "a lower validation loss")
    t.add_argument("--no-restore-best", action="store_true", help="keep the last weights after early stopping")
    t.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--out", default=None, help="also write the JSON result to this file")


def _optimizer_options(args):
    options = {}
    for item in args.opt:
        if "=" not in item:
            raise SystemExit(f"fastopt: --opt expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = _value(value.strip())
    if args.momentum is not None:
        options["momentum"] = args.momentum
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    if args.betas is not None:
        if len(args.betas) != 2:
            raise SystemExit("fastopt: --betas expects two numbers: beta1,beta2")
        options["beta1"], options["beta2"] = args.betas
    return options


def _experiment(args, optimizer=None):
    optimizer = optimizer or getattr(args, "optimizer", None)
    config = recommended_config(
        args.dataset, optimizer=optimizer, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
        schedule=args.schedule, clip_grad_norm=args.clip_grad_norm, patience=args.patience, seed=args.seed,
        optimizer_options=_optimizer_options(args), restore_best=not args.no_restore_best,
        progress=not (args.no_progress or args.json))
    return Experiment(dataset=args.dataset, data_path=args.data_path, model=args.model, hidden_sizes=args.hidden,
                      activation=args.activation, dropout=args.dropout, init=args.init, l1=args.l1, l2=args.l2,
                      dtype=args.dtype, device=args.device, train=config)


def _check_device(args):
    device_module(args.device)  # GPUUnavailableError before any data is loaded


def _write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=float)


def _fail(message):
    print(f"fastopt: error: {message}", file=sys.stderr)
    return 2


def _guarded(command):
    """Turn the errors a user can cause (no GPU, missing files, bad values) into one line and exit code 2."""
    def run(args):
        try:
            return command(args)
        except GPUUnavailableError as e:
            return _fail(str(e))
        except (FileNotFoundError, ValueError, ImportError) as e:
            return _fail(str(e))
    return run


# ------------------------------------------------------------------------------------------ train

def _metrics_table(metrics, task):
    keys = ["loss", "mse", "r2"] if task == "regression" else ["loss", "accuracy", "precision_macro",
                                                               "recall_macro", "f1_macro"]
    lines = [f"{'':>16}" + "".join(f"{split:>10}" for split in ("train", "val", "test"))]
    for k in keys:
        lines.append(f"{k:>16}" + "".join(f"{metrics[s][k]:>10.4f}" for s in ("train", "val", "test")))
    return "\n".join(lines)


def _cmd_train(args):
    _check_device(args)
    experiment = _experiment(args)
    result, model, data = experiment.run()
    plot_path = None
    if not args.no_plot:
        from fastopt.train.plots import plot_histories
        metric, _ = headline_metric(data.task)
        plot_path = plot_histories({experiment.train.optimizer: result.history}, args.plot, metric=metric,
                                   title=f"{model.describe()} on {data.name}")
    payload = {"experiment": experiment.to_dict(), "model": model.describe(), "data": data.summary(),
               "result": result.to_dict(), "plot": plot_path}
    _write_json(args.out, payload)
    if args.json:
        print(json.dumps(payload, indent=2, default=float))
        return 0
    c = experiment.train
    print(data.summary())
    print(f"model: {model.describe()}   device: {experiment.device}   dtype: {experiment.dtype}")
    print(f"optimizer: {c.optimizer} lr={c.resolved_lr():g} {c.optimizer_options or ''}  schedule: {c.schedule}  "
          f"batch: {c.batch_size}  clip: {c.clip_grad_norm}")
    stop = " (early stop)" if result.stopped_early else " (diverged)" if result.diverged else ""
    print(f"epochs: {result.epochs_run}{stop}  best epoch: {result.best_epoch}  "
          f"training time: {result.train_seconds:.2f} s ({result.train_seconds / result.epochs_run * 1e3:.1f} ms/epoch)")
    print(_metrics_table(result.metrics, data.task))
    if data.task != "regression" and data.n_classes <= 10:
        print("test confusion matrix (rows: true class, columns: predicted):")
        for row in result.metrics["test"]["confusion_matrix"]:
            print("   " + " ".join(f"{v:4d}" for v in row))
    if "coefficients" in result.metrics:
        co = result.metrics["coefficients"]
        w = ", ".join(f"{v:.4f}" for v in co["w"])
        print(f"coefficients on the raw data: w = [{w}], b = {co['b']:.4f}")
    if plot_path:
        print(f"plot: {plot_path}")
    return 0


# ------------------------------------------------------------------------------------------ compare

def _cmd_compare(args):
    _check_device(args)
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        return _fail(f"unknown optimizer(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    base = _experiment(args, optimizer=names[0])
    data = base.load_data()  # loaded once: every optimizer sees the same split and the same initial weights
    runs, histories = {}, {}
    for name in names:
        # each optimizer at its own default learning rate unless --lr is given; options only where they apply
        own_options = {k: v for k, v in base.train.optimizer_options.items() if k in REGISTRY[name].defaults}
        experiment = base.replace(optimizer=name, lr=args.lr, optimizer_options=own_options)
        result, model, _ = experiment.run(data=data, description=name)
        runs[name] = {"lr": experiment.train.resolved_lr(), "options": own_options, "result": result.to_dict()}
        histories[name] = result.history
    metric, _ = headline_metric(data.task)
    plot_path = None
    if not args.no_plot:
        from fastopt.train.plots import plot_histories
        plot_path = plot_histories(histories, args.plot, metric=metric,
                                   title=f"{model.describe()} on {data.name}, seed {args.seed}")
    payload = {"experiment": base.to_dict(), "data": data.summary(), "runs": runs, "plot": plot_path}
    _write_json(args.out, payload)
    if args.json:
        print(json.dumps(payload, indent=2, default=float))
        return 0
    print(data.summary())
    print(f"model: {model.describe()}   epochs: {base.train.epochs}   batch: {base.train.batch_size}   "
          f"seed: {args.seed}")
    header = f"{'optimizer':>10} {'lr':>9} {'train_loss':>11} {'val_loss':>9} {'val_' + metric:>13} " \
             f"{'test_' + metric:>14} {'best_epoch':>10} {'ms/epoch':>9}"
    print(header)
    for name, run in runs.items():
        r = run["result"]
        h = r["history"]
        print(f"{name:>10} {run['lr']:>9.3g} {h['train_loss'][-1]:>11.4f} {r['metrics']['val']['loss']:>9.4f} "
              f"{r['metrics']['val'][metric]:>13.4f} {r['metrics']['test'][metric]:>14.4f} {r['best_epoch']:>10d} "
              f"{r['train_seconds'] / r['epochs_run'] * 1e3:>9.1f}")
    if plot_path:
        print(f"plot: {plot_path}")
    return 0


# ------------------------------------------------------------------------------------------ search

def _cmd_search(args):
    _check_device(args)
    from fastopt.train import search as hp
    space = {"lr": hp.LogUniform(*args.lr_range), "batch_size": hp.Choice(args.batch_sizes),
             "weight_decay": hp.Choice(args.weight_decays)}
    if len(args.lr_range) != 2:
        return _fail("--lr-range expects two numbers: low,high")
    base = _experiment(args)

    def report(trial):
        if not args.json and not args.no_progress:
            value = f"{trial['objective']:.4g}"
            print(f"trial {trial['number']:>3}: val_loss {value}  {trial['params']}", file=sys.stderr)
    result = hp.search(base, space, method=args.method, n_trials=args.trials, n_jobs=args.jobs, seed=args.seed,
                       grid_points=args.grid_points, on_trial=report)
    out = args.out or "fastopt-search.json"
    _write_json(out, result)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
        return 0
    print(f"{args.method} search, {len(result['trials'])} trials on {args.jobs} process(es), "
          f"{result['seconds']:.1f} s; ranked by {result['objective']}")
    print(hp.format_table(result, args.top))
    best = result["best"]
    if best is not None:
        print(f"best: {best['params']}")
    print(f"results: {out}")
    return 0


# ------------------------------------------------------------------------------------------ wiring

def add_commands(sub) -> None:
    """Add train, compare and search to fastopt's subcommand parser."""
    train = sub.add_parser("train", help="train a model (default: MLP 64-128-10 on digits with Adam)")
    _add_common(train)
    train.add_argument("--plot", default="fastopt-train.png", help="PNG of the training curves")
    train.add_argument("--no-plot", action="store_true")
    train.set_defaults(func=_guarded(_cmd_train))

    compare = sub.add_parser("compare", help="several optimizers on the same data, seed and initial weights")
    _add_common(compare, optimizer=False)
    compare.add_argument("--optimizers", default=DEFAULT_COMPARE, help=f"comma-separated ({DEFAULT_COMPARE})")
    compare.add_argument("--plot", default="fastopt-compare.png", help="PNG of loss and metric curves")
    compare.add_argument("--no-plot", action="store_true")
    compare.set_defaults(func=_guarded(_cmd_compare))

    search = sub.add_parser("search", help="hyperparameter search (grid, random, Optuna TPE)")
    _add_common(search)
    search.add_argument("--method", choices=["grid", "random", "tpe"], default="random",
                        help="tpe needs Optuna")
    search.add_argument("--trials", type=int, default=20, help="random / tpe: number of trials")
    search.add_argument("--jobs", type=int, default=1, help="trials run in this many processes")
    search.add_argument("--lr-range", type=_floats, default=(1e-4, 1e-1), help="log-uniform low,high")
    search.add_argument("--batch-sizes", type=_ints, default=(16, 32, 64, 128))
    search.add_argument("--weight-decays", type=_floats, default=(0.0, 1e-4, 1e-3))
    search.add_argument("--grid-points", type=int, default=3, help="grid: points along the lr range")
    search.add_argument("--top", type=int, default=10, help="rows of the table")
    search.set_defaults(func=_guarded(_cmd_search))
