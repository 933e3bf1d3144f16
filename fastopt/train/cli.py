"""`fastopt train | compare | search`: added to fastopt's command line by fastopt/cli.py.

    fastopt train                              # MLP 64-128-10 on digits with Adam: metrics + a PNG
    fastopt train --dataset breast_cancer      # logistic regression; diabetes/linear: linear regression
    fastopt compare --optimizers sgd,adam,lion --epochs 10
    fastopt search --method random --trials 20 --jobs 2

Everything a user gives is checked before data is loaded or a model trained (exit code 2, one line
naming the option and the value); a run whose loss becomes NaN/Inf stops there and exits with 1.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastopt.cli_args import (RunError, UsageError, check_output_path, dumps, fmt, integer, listing, optimizer_names,
                         real, write_json)
from fastopt.specs import COMPOSITE, REGISTRY, all_optimizer_names
from fastopt.train.arrays import GPUUnavailableError, device_module
from fastopt.train.data import DATASETS
from fastopt.train.experiment import DTYPES, MODELS, RECOMMENDED, Experiment, recommended_config
from fastopt.train.metrics import headline_metric
from fastopt.train.models import ACTIVATIONS, INITS
from fastopt.train.trainer import SCHEDULES, describe_divergence, option_defaults

DEFAULT_COMPARE = "sgd,rmsprop,adam,adamw,lion"
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")

# ------------------------------------------------------------------------------------------ options

def _opt_item(text):
    """--opt KEY=VALUE: split only; the value is converted per hyperparameter (bool or number) later."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key, value = key.strip(), value.strip()
    if not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_common(p, *, optimizer=True, search=False):
    """The options train, compare and search share (search: --lr, --batch-size and --weight-decay are parsed only to
    point at the ranges it samples them from, so its help leaves them out)."""
    sampled = {"help": argparse.SUPPRESS} if search else {}
    data = p.add_argument_group("data and model")
    data.add_argument("--dataset", "-d", choices=DATASETS, default="digits")
    data.add_argument("--data-path", default=None, help="mnist: directory with the four IDX files (or .gz)")
    data.add_argument("--model", "-m", choices=MODELS, default="auto",
                      help="auto: linear for linear/diabetes, logistic for breast_cancer/wine, mlp for images")
    data.add_argument("--hidden", type=listing(integer("hidden size", low=1), "hidden sizes"), default=(128,),
                      help="MLP hidden sizes, comma-separated (128)")
    data.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    data.add_argument("--dropout", type=real("dropout", low=0.0, high=1.0, high_open=True), default=0.0,
                      help="dropout probability in [0, 1)")
    data.add_argument("--init", choices=INITS, default="auto", help="auto: He for relu, Xavier otherwise")
    data.add_argument("--l1", type=real("L1 penalty", low=0.0), default=0.0, help="L1 penalty on the weights")
    data.add_argument("--l2", type=real("L2 penalty", low=0.0), default=0.0, help="L2 penalty on the weights")
    data.add_argument("--dtype", choices=list(DTYPES), default="float32")
    data.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: CuPy arrays on a CUDA GPU")
    t = p.add_argument_group("training (unset: the data set's recommended values)")
    if optimizer:
        t.add_argument("--optimizer", "-o", choices=list(all_optimizer_names()), default=None)
    t.add_argument("--lr", type=real("learning rate", low=0.0), default=None,
                   **(sampled or {"help": "learning rate (default: the data set's tuned rate, scaled per optimizer)"}))
    t.add_argument("--momentum", type=real("momentum", low=0.0), default=None)
    t.add_argument("--weight-decay", type=real("weight decay", low=0.0), default=None, **sampled)
    t.add_argument("--betas", type=listing(real("beta", low=0.0, high=1.0, high_open=True), "betas", length=2),
                   default=None, help="beta1,beta2, each in [0, 1)")
    t.add_argument("--opt", type=_opt_item, action="append", default=[], metavar="KEY=VALUE",
                   help="any other optimizer hyperparameter (repeatable), e.g. --opt nesterov=true")
    t.add_argument("--epochs", type=integer("number of epochs", low=1), default=None)
    t.add_argument("--batch-size", type=integer("batch size", low=1), default=None, **sampled)
    t.add_argument("--schedule", choices=SCHEDULES, default=None)
    t.add_argument("--clip-grad-norm", type=real("clip_grad_norm", low=0.0, low_open=True), default=None,
                   help="clip the gradient's global norm to this (> 0)")
    t.add_argument("--patience", type=integer("patience", low=0), default=None,
                   help="early stopping after this many epochs without a lower validation loss")
    t.add_argument("--no-restore-best", action="store_true", help="keep the last weights after early stopping")
    t.add_argument("--seed", type=integer("seed", low=0), default=0)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--out", default=None, help=(
        "write the JSON result to this file (default fastopt-search.json; its directory must exist)" if search else
        "also write the JSON result to this file (its directory must exist)"))


def _hyper(name, key):
    """The registry's or the composite spec's Hyper for `key`; None for a trainer-only option (muon's adamw_lr)."""
    spec = REGISTRY.get(name) or COMPOSITE[name]
    return next((h for h in spec.hypers if h.name == key), None)


def _convert(name, key, text, source):
    """The value of one hyperparameter from command-line text (UsageError when it cannot be read). Composite
    optimizers' kinds: ints (max_iter, ns_steps, history_size; max_eval also none), strings (line_search_fn,
    adjust_lr_fn; none for None); the tuple-valued ones (adafactor's eps, muon's ns_coefficients) are refused."""
    hyper = _hyper(name, key)
    kind = "float" if hyper is None else hyper.kind
    if kind == "bool":
        if text.lower() not in TRUE + FALSE:
            raise UsageError(f"{source}: {key} takes true or false, got {text!r}")
        return text.lower() in TRUE
    if kind in ("int", "int_or_none"):
        if kind == "int_or_none" and text.lower() == "none":
            return None
        try:
            return int(text)
        except ValueError:
            more = " or none" if kind == "int_or_none" else ""
            raise UsageError(f"{source}: {key} takes an integer{more}, got {text!r}") from None
    if kind == "choice":
        return None if text.lower() == "none" else text
    if kind in ("pair", "triple"):
        raise UsageError(f"{source}: {key} is a tuple ({hyper.doc}); the command line does not set it "
                         f"(TrainConfig.optimizer_options does)")
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{source}: {key} takes a number, got {text!r}") from None


def _requested_options(args):
    """[(registry name, value or text, source option)] from --opt, --momentum, --weight-decay, --betas."""
    items = [(key, value, f"--opt {key}={value}") for key, value in args.opt]
    if args.momentum is not None:
        items.append(("momentum", args.momentum, "--momentum"))
    if args.weight_decay is not None:
        items.append(("weight_decay", args.weight_decay, "--weight-decay"))
    if args.betas is not None:
        items += [("beta1", args.betas[0], "--betas"), ("beta2", args.betas[1], "--betas")]
    given = {}
    for key, _, source in items:  # one value per hyperparameter: two options for one key is a usage error
        if key in given and given[key] != source:
            raise UsageError(f"{source} and {given[key]} both set {key}; give it once")
        given.setdefault(key, source)
    return items


def _optimizer_options(args, name, *, only_known=False):
    """The options for optimizer `name`, each checked by the registry and reported with its option.
    only_known (compare): leave out options `name` does not take instead of failing. A composite
    optimizer's ints and strings are checked with the whole configuration (its class's checks)."""
    known = option_defaults(name)
    options = {}
    for key, value, source in _requested_options(args):
        if key not in known or key == "lr":
            if only_known and key != "lr":
                continue
            hint = "use --lr" if key == "lr" else f"it takes {', '.join(h for h in known if h != 'lr')}"
            raise UsageError(f"{source}: {name} has no hyperparameter {key!r}; {hint}")
        if isinstance(value, str):
            value = _convert(name, key, value, source)
        hyper = _hyper(name, key)
        if hyper is not None and hyper.kind in ("float", "bool"):
            try:
                hyper.validate(value)
            except (TypeError, ValueError) as e:
                raise UsageError(f"{source}: {e}") from None
        options[key] = value
    return options


def _experiment(args, optimizer=None, options=None):
    optimizer = (optimizer or getattr(args, "optimizer", None)
                 or RECOMMENDED.get(args.dataset, {}).get("optimizer", "adam"))
    config = recommended_config(
        args.dataset, optimizer=optimizer, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
        schedule=args.schedule, clip_grad_norm=args.clip_grad_norm, patience=args.patience, seed=args.seed,
        optimizer_options=options if options is not None else _optimizer_options(args, optimizer),
        restore_best=not args.no_restore_best, progress=not (args.no_progress or args.json))
    experiment = Experiment(dataset=args.dataset, data_path=args.data_path, model=args.model,
                            hidden_sizes=args.hidden, activation=args.activation, dropout=args.dropout,
                            init=args.init, l1=args.l1, l2=args.l2, dtype=args.dtype, device=args.device,
                            train=config)
    named = f"-o {optimizer}" if getattr(args, "optimizer", None) else optimizer  # (compare has no -o)
    _check_experiment(experiment, [source for key, _, source in _requested_options(args)
                                   if key in config.optimizer_options], named)
    return experiment


def _check_experiment(experiment, sources=(), named=None):
    """Everything the run would reject, as a usage error, before data is loaded. `sources`: the options
    that set optimizer hyperparameters (named when their combination is invalid); `named`: how the message
    names the optimizer (train: its -o option)."""
    c = experiment.train
    try:
        c.check()
    except (TypeError, ValueError) as e:
        given = f" with {', '.join(dict.fromkeys(sources))}" if sources else ""
        raise UsageError(f"{named or c.optimizer}{given}: {e}") from None
    try:
        experiment.check()
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def _check_inputs(args, *, plot=None):
    """Up front: the GPU, the data path, the output files (nothing is created)."""
    try:
        device_module(args.device)  # GPUUnavailableError before any data is loaded
    except GPUUnavailableError as e:
        raise UsageError(str(e)) from None
    if args.data_path is not None and args.dataset != "mnist":
        raise UsageError(f"--data-path is only read for -d mnist (the data set is {args.dataset})")
    if args.dataset == "mnist":
        from fastopt.train.data import mnist_files
        try:
            mnist_files(args.data_path)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    if args.out is not None:  # --out "" too: refused, not ignored
        check_output_path("--out", args.out)
    if plot is not None:
        check_output_path("--plot", plot)
        if args.out and _same_file(args.out, plot):  # the JSON would be written over the plot
            raise UsageError(f"--out {args.out} is the plot's file too (--plot {plot}); give the JSON another "
                             f"name, or pass --no-plot")
        from fastopt.train.plots import check_plot_path
        try:
            check_plot_path(plot)
        except ValueError as e:
            raise UsageError(f"--plot {e}") from None
        except ImportError as e:  # the plot is on by default: say how to go without it
            raise UsageError(f"--plot {plot}: {e}, or pass --no-plot") from None


def _same_file(a, b) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _load(experiment):
    try:
        return experiment.load_data()
    except (FileNotFoundError, ValueError, ImportError) as e:  # a damaged IDX file, scikit-learn missing
        raise UsageError(str(e)) from None


def _divergence_message(name, lr, divergence):
    # lbfgs takes no clipping (fastopt/train/composite.py); its line search is what keeps it stable
    remedy = ("use the line search (--opt line_search_fn=strong_wolfe)" if name == "lbfgs"
              else "set --clip-grad-norm 1")
    return (f"training diverged: {describe_divergence(divergence)} ({name}, lr={lr:g}); "
            f"lower --lr (e.g. --lr {lr / 10:g}) or {remedy}")


def _batch_text(optimizer, batch_size, n_train):
    """The batch an optimizer trains with, as the tables show it: "full" for the whole training set (L-BFGS
    always; another optimizer whose batch size reaches the set's size)."""
    return "full" if optimizer == "lbfgs" or batch_size >= n_train else batch_size


def _write_out(path, payload):
    if path:
        write_json(path, payload)


# ------------------------------------------------------------------------------------------ train

def _metrics_table(metrics, task):
    keys = ["loss", "mse", "r2"] if task == "regression" else ["loss", "accuracy", "precision_macro",
                                                               "recall_macro", "f1_macro"]
    lines = [f"{'':>16}" + "".join(f"{split:>12}" for split in ("train", "val", "test"))]
    for k in keys:
        lines.append(f"{k:>16}" + "".join(f"{fmt(metrics[s][k]):>12}" for s in ("train", "val", "test")))
    return "\n".join(lines)


def _cmd_train(args):
    plot = None if args.no_plot else args.plot
    _check_inputs(args, plot=plot)
    experiment = _experiment(args)
    data = _load(experiment)
    result, model, data = experiment.run(data=data)
    c = experiment.train
    plot_path = None
    if plot and not result.diverged:
        from fastopt.train.plots import plot_histories
        metric, _ = headline_metric(data.task)
        plot_path = plot_histories({c.optimizer: result.history}, plot, metric=metric,
                                   title=f"{model.describe()} on {data.name}")
    payload = {"status": "diverged" if result.diverged else "ok", "experiment": experiment.to_dict(),
               "model": model.describe(), "data": data.summary(), "result": result.to_dict(), "plot": plot_path}
    _write_out(args.out, payload)
    failure = _divergence_message(c.optimizer, c.resolved_lr(), result.divergence) if result.diverged else None
    if args.json:
        print(dumps(payload))
    else:
        print(data.summary())
        print(f"model: {model.describe()}   device: {experiment.device}   dtype: {experiment.dtype}")
        print(f"optimizer: {c.optimizer} lr={c.resolved_lr():g} {c.optimizer_options or ''}  schedule: {c.schedule}  "
              f"batch: {_batch_text(c.optimizer, c.batch_size, len(data.y_train))}  clip: {c.clip_grad_norm}")
    if failure:
        raise RunError(failure)
    if args.json:
        return 0
    stop = " (early stop)" if result.stopped_early else ""
    print(f"epochs: {result.epochs_run}{stop}  best epoch: {result.best_epoch}  "
          f"training time: {result.train_seconds:.2f} s ({result.train_seconds / result.epochs_run * 1e3:.1f} ms/epoch)")
    print(_metrics_table(result.metrics, data.task))
    if data.task != "regression" and data.n_classes <= 10:
        print("test confusion matrix (rows: true class, columns: predicted):")
        for row in result.metrics["test"]["confusion_matrix"]:
            print("   " + " ".join(f"{v:4d}" for v in row))
    if "coefficients" in result.metrics:
        co = result.metrics["coefficients"]
        w = ", ".join(fmt(v) for v in co["w"])
        print(f"coefficients on the raw data: w = [{w}], b = {fmt(co['b'])}")
    if plot_path:
        print(f"plot: {plot_path}")
    return 0


# ------------------------------------------------------------------------------------------ compare

def _cmd_compare(args):
    plot = None if args.no_plot else args.plot
    _check_inputs(args, plot=plot)
    names = args.optimizers
    # each optimizer gets the options that apply to it; an option that applies to none is an error
    options = {name: _optimizer_options(args, name, only_known=True) for name in names}
    for key, _, source in _requested_options(args):
        if not any(key in option_defaults(name) for name in names):
            raise UsageError(f"{source}: none of {', '.join(names)} has a hyperparameter {key!r}")
    experiments = {}
    for name in names:  # every combination checked before the first run
        experiments[name] = _experiment(args, optimizer=name, options=options[name])
    base = experiments[names[0]]
    data = _load(base)  # loaded once: every optimizer sees the same split and the same initial weights
    runs, histories, failures = {}, {}, []
    for name, experiment in experiments.items():
        # each optimizer at its own recommended learning rate unless --lr is given (recommended_config)
        result, model, _ = experiment.run(data=data, description=name)
        lr = experiment.train.resolved_lr()
        runs[name] = {"status": "diverged" if result.diverged else "ok", "lr": lr,
                      "batch_size": experiment.train.batch_size, "options": dict(experiment.train.optimizer_options),
                      "result": result.to_dict()}
        histories[name] = result.history
        if result.diverged:
            failures.append(f"{name}: {describe_divergence(result.divergence)} (lr={lr:g})")
    metric, _ = headline_metric(data.task)
    plot_path = None
    if plot and any(h["epoch"] for h in histories.values()):
        from fastopt.train.plots import plot_histories
        plot_path = plot_histories(histories, plot, metric=metric,
                                   title=f"{model.describe()} on {data.name}, seed {args.seed}")
    payload = {"status": "diverged" if failures else "ok", "experiment": base.to_dict(), "data": data.summary(),
               "runs": runs, "plot": plot_path}
    _write_out(args.out, payload)
    if args.json:
        print(dumps(payload))
    else:
        print(data.summary())
        print(f"model: {model.describe()}   epochs: {base.train.epochs}   seed: {args.seed}")
        w = max(10, *(len(name) for name in runs))  # schedule_free_adamw: 19
        header = f"{'optimizer':>{w}} {'lr':>9} {'batch':>6} {'train_loss':>11} {'val_loss':>11} " \
                 f"{'val_' + metric:>13} {'test_' + metric:>14} {'best_epoch':>10} {'ms/epoch':>9}"
        print(header)
        for name, run in runs.items():
            r = run["result"]
            h = r["history"]
            ms = r["train_seconds"] / max(r["epochs_run"], 1) * 1e3
            # the batch each optimizer trained with (Rprop on digits: the full set; L-BFGS: always)
            batch = _batch_text(name, run["batch_size"], len(data.y_train))
            if r["diverged"]:
                print(f"{name:>{w}} {run['lr']:>9.3g} {batch:>6}   diverged: {describe_divergence(r['divergence'])}")
                continue
            print(f"{name:>{w}} {run['lr']:>9.3g} {batch:>6} {fmt(h['train_loss'][-1]):>11} "
                  f"{fmt(r['metrics']['val']['loss']):>11} "
                  f"{fmt(r['metrics']['val'][metric]):>13} {fmt(r['metrics']['test'][metric]):>14} "
                  f"{r['best_epoch']:>10d} {ms:>9.1f}")
        if plot_path:
            print(f"plot: {plot_path}")
    if failures:
        raise RunError("training diverged for " + "; ".join(failures) + "; lower --lr or set --clip-grad-norm 1")
    return 0


# ------------------------------------------------------------------------------------------ search

def _cmd_search(args):
    for option, value, instead in (("--lr", args.lr, "--lr-range"), ("--batch-size", args.batch_size, "--batch-sizes"),
                                   ("--weight-decay", args.weight_decay, "--weight-decays")):
        if value is not None:
            raise UsageError(f"{option} {value:g}: search samples this from {instead}; give {instead} instead")
    out = args.out if args.out is not None else "fastopt-search.json"
    _check_inputs(args)
    check_output_path("--out", out)
    import fastopt.train.search as hp
    low, high = args.lr_range
    if not low < high:
        raise UsageError(f"--lr-range {low:g},{high:g}: needs low < high")
    space = {"lr": hp.LogUniform(low, high), "batch_size": hp.Choice(args.batch_sizes),
             "weight_decay": hp.Choice(args.weight_decays)}
    base = _experiment(args)
    if "weight_decay" not in option_defaults(base.train.optimizer):
        del space["weight_decay"]
    if args.method == "tpe" and not hp.optuna_available():
        raise UsageError("--method tpe needs Optuna: pip install 'fastopt[search]' (or use --method random)")

    def report(trial):
        if not args.json and not args.no_progress:
            outcome = f"val_loss {fmt(trial['objective'])}" if trial["status"] == "ok" else trial["error"]
            print(f"trial {trial['number']:>3}: {outcome}  {trial['params']}", file=sys.stderr)
    result = hp.search(base, space, method=args.method, n_trials=args.trials, n_jobs=args.jobs, seed=args.seed,
                       grid_points=args.grid_points, on_trial=report)
    result["status"] = "ok" if result["best"] is not None else "failed"
    write_json(out, result)
    if args.json:
        print(dumps(result))
    else:
        print(f"{args.method} search, {len(result['trials'])} trials on {result['n_jobs']} process(es), "
              f"{result['seconds']:.1f} s; ranked by {result['objective']}")
        print(hp.format_table(result, args.top))
        best = result["best"]
        if best is not None:
            print(f"best: {best['params']}")
        print(f"results: {out}")
    if result["best"] is None:
        raise RunError(f"no trial finished: every one of the {len(result['trials'])} trials diverged or failed "
                       "(see the table); lower --lr-range")
    return 0


# ------------------------------------------------------------------------------------------ wiring

def add_commands(sub) -> None:
    """Add train, compare and search to fastopt's subcommand parser."""
    train = sub.add_parser("train", help="train a model (default: MLP 64-128-10 on digits with Adam)")
    _add_common(train)
    train.add_argument("--plot", default="fastopt-train.png",
                       help="image of the training curves (.png, .pdf, .svg; the directory must exist)")
    train.add_argument("--no-plot", action="store_true")
    train.set_defaults(func=_cmd_train, _parser=train)

    compare = sub.add_parser("compare", help="several optimizers on the same data, seed and initial weights")
    _add_common(compare, optimizer=False)
    compare.add_argument("--optimizers", type=optimizer_names, default=optimizer_names(DEFAULT_COMPARE),
                         help=f"comma-separated ({DEFAULT_COMPARE})")
    compare.add_argument("--plot", default="fastopt-compare.png",
                         help="image of loss and metric curves (the directory must exist)")
    compare.add_argument("--no-plot", action="store_true")
    compare.set_defaults(func=_cmd_compare, _parser=compare)

    search = sub.add_parser("search", help="hyperparameter search (grid, random, Optuna TPE)")
    _add_common(search, search=True)
    search.add_argument("--method", choices=["grid", "random", "tpe"], default="random",
                        help="tpe needs Optuna")
    search.add_argument("--trials", type=integer("number of trials", low=1), default=20,
                        help="random / tpe: number of trials (>= 1)")
    search.add_argument("--jobs", type=integer("number of jobs", low=1), default=1,
                        help="trials run in this many processes")
    search.add_argument("--lr-range", type=listing(real("learning rate", low=0.0, low_open=True), "lr range",
                                                   length=2),
                        default=(1e-4, 1e-1), help="log-uniform low,high (0 < low < high)")
    search.add_argument("--batch-sizes", type=listing(integer("batch size", low=1), "batch sizes"),
                        default=(16, 32, 64, 128))
    search.add_argument("--weight-decays", type=listing(real("weight decay", low=0.0), "weight decays"),
                        default=(0.0, 1e-4, 1e-3))
    search.add_argument("--grid-points", type=integer("number of grid points", low=1), default=3,
                        help="grid: points along the lr range")
    search.add_argument("--top", type=integer("number of rows", low=1), default=10, help="rows of the table")
    search.set_defaults(func=_cmd_search, _parser=search)
