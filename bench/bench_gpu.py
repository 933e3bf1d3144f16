"""GPU benchmark: `python bench/bench_gpu.py [--quick] [--dry-run] [--out FILE]`. An entry point: the same as
`fastopt bench --device gpu` (fastopt/benchmark_gpu.py), writing bench/results/gpu-<device>.json unless --out
is given (`make gpu-check` passes its own)."""
import os
import sys

from fastopt.cli import main


def default_out(argv):
    """bench/results/gpu-<device>.json, or None when the arguments choose the output, ask for the plan only,
    or no GPU can be asked for its name (then fastopt bench itself reports the missing GPU)."""
    if any(a == "--out" or a.startswith("--out=") or a in ("--dry-run", "-h", "--help") for a in argv):
        return None
    try:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    except Exception:
        return None
    from fastopt.benchmark_gpu import device_slug
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu-{device_slug(name)}.json")


if __name__ == "__main__":
    args = sys.argv[1:]
    out = default_out(args)
    sys.exit(main(["bench", "--device", "gpu", *(["--out", out] if out else []), *args]))
