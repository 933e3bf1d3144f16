"""Command line: `fastopt bench | info` (train, compare and search come with fastopt.train)."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_bench(args):
    from fastopt import benchmark
    if args.device == "gpu":
        from fastopt import benchmark_gpu  # provided by the GPU backends
        return benchmark_gpu.main(args)
    return benchmark.main(args)


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
        "optimizers": list(fastopt.REGISTRY),
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
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="fastopt", description="Fused optimizer-update kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark the update kernels")
    bench.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    bench.add_argument("--sizes", default=None, help="comma-separated element counts (default 1e5,1e6,1e7)")
    bench.add_argument("--optimizers", default=None, help="comma-separated names (default: all)")
    bench.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    bench.add_argument("--out", default=None, help="write the JSON results here")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(func=_cmd_bench)
    info = sub.add_parser("info", help="versions, backends, GPU")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)
    return parser, sub


def main(argv=None):
    parser, sub = build_parser()
    try:  # the trainer's commands (train, compare, search), when that part is installed
        from fastopt.train import cli as train_cli
        train_cli.add_commands(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
