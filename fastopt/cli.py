"""Command line: `fastopt bench | info` (train, compare and search come with fastopt.train).

Exit codes: 0 success; 2 bad input (argparse's usage-error code: an invalid option value, an unknown
name, an output path that cannot be written, a GPU that is not there), reported on one line naming the
option and the value, before any long work starts; 1 a run that failed (training diverged, out of
memory); 130 interrupted (Ctrl-C). Every JSON file or --json output is strict JSON (no NaN/Infinity).
"""
from __future__ import annotations

import argparse
import os
import sys


from fastopt.cli_args import (UsageError, RunError, integer, listing, fused_optimizer_names, check_output_path, dumps,
                              thread_count)


# ------------------------------------------------------------------------------------------ bench, info

def _cmd_bench(args):
    if args.out is not None:  # --out "" too: refused, not ignored
        check_output_path("--out", args.out)
    if args.torch:
        return _cmd_bench_torch(args)
    if args.dry_run and args.device != "gpu":
        raise UsageError("--dry-run: only with --device gpu (it prints the GPU benchmark's cases)")
    if args.device == "gpu" and args.dry_run:
        from fastopt import benchmark_gpu
        return benchmark_gpu.main(args)  # the plan only: no GPU needed
    if args.device == "gpu":
        from fastopt.train.arrays import GPUUnavailableError, device_module
        try:
            device_module("gpu")  # CuPy importable and a CUDA device present, before anything else
        except GPUUnavailableError as e:
            raise UsageError(f"bench {e}") from None
        from fastopt import benchmark_gpu
        return benchmark_gpu.main(args)
    from fastopt import benchmark
    return benchmark.main(args)


def _cmd_bench_torch(args):
    """`fastopt bench --torch`: fastopt.torch against torch.optim (fastopt/benchmark_torch.py)."""
    for option, value in (("--sizes", args.sizes), ("--optimizers", args.optimizers), ("--dry-run", args.dry_run)):
        if value:
            raise UsageError(f"{option}: not with --torch (it times fixed models' parameter lists)")
    try:
        import torch
    except ImportError:
        raise UsageError("--torch: PyTorch is not installed (pip install torch)") from None
    if args.device == "gpu" and not torch.cuda.is_available():
        raise UsageError("--torch --device gpu: torch sees no CUDA GPU")
    from fastopt import benchmark_torch
    return benchmark_torch.cli(args)


def _cmd_info(args):
    import platform

    import numpy as np

    import fastopt
    from fastopt.backends import dispatch
    info = {
        "fastopt": fastopt.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_backend": "cython" if dispatch.cython_available() else "numpy (extension not built)",
        "cpu_threads": fastopt.get_num_threads(),
        "optimizers": list(fastopt.specs.all_optimizer_names()),
    }
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        import cupy
        info["cupy"] = cupy.__version__
        try:
            info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        except Exception as e:  # no device / no driver
            info["gpu"] = None
            info["gpu_error"] = str(e).splitlines()[0]
    except ImportError:
        info["cupy"] = None
        info["gpu"] = None
    if args.json:
        print(dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v}")
    return 0


def _version():
    try:
        from fastopt import __version__
    except ImportError as e:  # a broken install: still say which copy this is
        return f"fastopt (version unknown: {e})"
    return f"fastopt {__version__}"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `fastopt train: error: argument --lr: Invalid learning rate: -0.1
    (see fastopt train --help)` and exit code 2, instead of the full usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = Parser(prog="fastopt", description="Fused optimizer-update kernels.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark the update kernels",
                           description="Benchmark the update kernels: every optimizer's step against the NumPy "
                                       "reference, torch.optim and a same-pattern bandwidth ceiling (--device gpu: "
                                       "the GPU benchmark; --torch: fastopt.torch against torch.optim).")
    bench.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    # >= 100: the list variant splits N elements into 100 arrays
    bench.add_argument("--sizes", type=listing(integer("size", low=100, allow_exponent=True), "sizes"), default=None,
                       help="comma-separated element counts, each >= 100 (default 1e5,1e6,1e7)")
    bench.add_argument("--optimizers", type=fused_optimizer_names, default=None,
                       help="comma-separated names of the fused (registry) optimizers (default: all)")
    bench.add_argument("--repeats", type=integer("number of repeats", low=1), default=None,
                       help="timed repetitions per variant")
    bench.add_argument("--threads", type=thread_count(), default=None,
                       help="CPU threads (default: OMP_NUM_THREADS, else all cores)")
    bench.add_argument("--out", default=None, help="write the JSON results here (the directory must exist)")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--torch", action="store_true",
                       help="fastopt.torch against torch.optim (fused, foreach, for-loop) on GPT-2 small, "
                            "ResNet-50 and 100 x 10,000 parameter lists")
    bench.add_argument("--dry-run", action="store_true",
                       help="with --device gpu: print the cases, variants and memory per case, run nothing")
    bench.set_defaults(func=_cmd_bench, _parser=bench)
    info = sub.add_parser("info", help="versions, backends, GPU",
                          description="Print the versions, the CPU backend and threads, the optimizers and the GPU.")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info, _parser=info)
    return parser, sub


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def main(argv=None) -> int:
    """Run the command line with `argv` (default sys.argv[1:]); returns the exit code (never raises
    SystemExit, so it can be called in-process)."""
    parser, sub = build_parser()
    try:  # the trainer's commands (train, compare, search), when that part is installed
        from fastopt.train import cli as train_cli
        train_cli.add_commands(sub)
    except ImportError:
        pass
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the parser they were given to ("fastopt compare: error: ..." after the command)
            given = list(sys.argv[1:] if argv is None else argv)
            command_at = given.index(args.command) if args.command in given else len(given)
            owner = parser if any(a in given[:command_at] for a in extra) else args._parser
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # usage errors (2), --help and --version (0)
        return _exit_code(e)
    command = f"fastopt {args.command}"
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at interpreter exit
        return code
    except UsageError as e:
        try:
            args._parser.error(str(e))  # usage line, "fastopt train: error: ...", exit code 2
        except SystemExit as exit_:
            return _exit_code(exit_)
    except RunError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"{command}: error: out of memory{f' ({e})' if str(e) else ''}; try smaller sizes", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly, as a piped tool does
        _silence_stdout()
        return 141  # 128 + SIGPIPE, the code of a tool the signal ended


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # (a stdout without a file descriptor: nothing to flush there)
        pass


if __name__ == "__main__":
    sys.exit(main())
