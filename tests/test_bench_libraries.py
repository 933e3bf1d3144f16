"""bench/bench_libraries.py (fastopt vs torch / optimi / torchao / bitsandbytes, issue 13) at a tiny size: the
harness, the agreement check it asserts, and each installed library's rows. Libraries that are not
installed are skipped (CI installs only the test extras); the torch-only case needs torch alone."""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")
pytest.importorskip("fastopt.kernels.cpu._cpu_fast")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_libraries as bl  # noqa: E402

# two tensors of 4096 in the list: torchao and bitsandbytes quantize tensors of 4096 elements and more only
N, TENSORS = 8192, 2


def _rows(report, label):
    return [r for r in report["rows"] if r["implementation"] == label]


@pytest.mark.parametrize("n,tensors", [(1000, 1), (8192, 2), (10_000_000, 200), (51_201, 200)])
def test_layout_sizes_are_whole_blocks_of_the_rounded_total(n, tensors):
    total, one, many = bl.layout_sizes(n, tensors)
    assert total % 256 == 0 and n <= total < n + 256
    assert one == [total] and sum(many) == total and len(many) == tensors
    assert all(s % 256 == 0 and s > 0 for s in many) and max(many) - min(many) <= 256


def test_layout_sizes_rejects_a_list_longer_than_the_blocks():
    with pytest.raises(ValueError, match="n=1000"):
        bl.layout_sizes(1000, 8)


def test_agreement_check_fails_on_a_library_a_few_ulps_off():
    """The check the benchmark asserts: a 'library' 16 ulps away from its fastopt reference on every
    element fails it; one equal to it passes; a run that never moved its params fails too."""
    init = (0.02 * torch.randn(4096, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    moved = (init.float() - 1e-3).to(torch.bfloat16)
    ulp = bl._ulp(moved.float(), torch.bfloat16)

    def impl(label, params, ref=None):
        return bl.Impl(label, "x", [params], lambda t: None, "bf16/bf16", {}, ref=ref, kind="bf16")
    ref = impl("fastopt", moved)
    same = impl("lib", moved.clone(), ref="fastopt")
    assert bl.check_agreement([ref, same], init.float())["lib"]["max_abs_diff"] == 0
    off = impl("lib", (moved.float() + 16 * ulp).to(torch.bfloat16), ref="fastopt")
    with pytest.raises(AssertionError, match="lib vs fastopt"):
        bl.check_agreement([ref, off], init.float())
    still = impl("lib", init.clone(), ref="fastopt")
    with pytest.raises(AssertionError, match="changed"):
        bl.check_agreement([ref, still], init.float())


def _check_report(report, labels):
    for label in labels:
        rows = _rows(report, label)
        assert rows, f"no row for {label}; unsupported: {report['unsupported']}"
        for r in rows:
            assert r["ms_min"] > 0 and r["ms_median"] >= r["ms_min"]
            assert r["fraction_of_ceiling_median"] > 0 and r["bytes_per_param"] > 0
            assert r["ratio_fastopt_over_this_median"]  # measured against each fastopt row of its group
            key = f"{r['group']}, {r['layout']}"
            entry = report["agreement"][key][label]
            assert entry["fraction_of_params_changed"] > 0.5
            if r["library"] != "fastopt":
                assert entry["compared_with"].startswith("fastopt")


def test_fastopt_and_torch_rows():
    report = bl.measure(N, TENSORS, threads=1, reps=2, warmup=1, groups=("bf16",), libraries=(), progress=False)
    _check_report(report, ["fastopt adamw_step (NumPy), fp32 state", "fastopt.torch AdamW, bf16 state",
                           "torch AdamW fused (bf16 state)", "torch AdamW foreach (bf16 state)",
                           "fastopt.torch AdamW + kahan, bf16 state"])
    fused = _rows(report, "torch AdamW fused (bf16 state)")[0]
    assert fused["state_bytes_per_param"] == 4 and fused["bytes_per_param"] == 14  # torch keeps bf16 state
    assert _rows(report, "fastopt.torch AdamW, fp32 state")[0]["state_bytes_per_param"] == 8
    assert {r["layout"] for r in report["rows"]} == {"one tensor", "list"}
    assert report["missing"] == {} and report["unsupported"] == {}
    table = bl.markdown_table({**report, "machine": {"cpu": "cpu"}, "threads": 1, "command": "cmd",
                               "load_average_before": (0.5, 0, 0), "load_average_after": (0.5, 0, 0)})
    line = [x for x in table.splitlines() if "torch AdamW fused" in x][0]
    assert line.startswith("| bf16 params |") and line.count("|") == 7  # both layouts and the factor
    assert float(line.split("|")[-2].split("/")[0]) > 0
    assert "fastopt adamw_step" not in table  # the NumPy rows stay in the JSON


def test_optimi_rows():
    pytest.importorskip("optimi")
    report = bl.measure(N, TENSORS, threads=1, reps=2, warmup=1, groups=("bf16",), layouts=("list",),
                        libraries=("optimi",), progress=False)
    _check_report(report, ["optimi AdamW (bf16 state)", "optimi AdamW kahan_sum (bf16 state)"])
    assert _rows(report, "optimi AdamW kahan_sum (bf16 state)")[0]["state_bytes_per_param"] == 6


def test_torchao_rows():
    pytest.importorskip("torchao.optim")
    # one layout of one shape: torchao compiles its step per shape (seconds each)
    report = bl.measure(N, TENSORS, threads=1, reps=2, warmup=1, groups=("sr", "int8-bf16"), layouts=("list",),
                        libraries=("torchao",), progress=False)
    _check_report(report, ["torchao _AdamW bf16_stochastic_round (bf16 state)", "torchao AdamW8bit"])
    assert _rows(report, "torchao AdamW8bit")[0]["state_bytes_per_param"] < 2.1  # 8-bit codes, not bf16


def test_bitsandbytes_rows_or_recorded_exception():
    pytest.importorskip("bitsandbytes")
    report = bl.measure(N, TENSORS, threads=1, reps=2, warmup=1, groups=("int8-fp32",), layouts=("list",),
                        libraries=("bitsandbytes",), progress=False)
    label = "bitsandbytes AdamW8bit"
    if _rows(report, label):
        _check_report(report, [label])
        # codes (2 bytes), a float32 absmax per 256-block and state, and a 256-entry float32 map per state
        # and tensor (bitsandbytes keeps one per param)
        expected = 2 + 8 / 256 + 2048 * TENSORS / N
        assert _rows(report, label)[0]["state_bytes_per_param"] == pytest.approx(expected, abs=1e-4)
    else:  # no CPU support in this version: the exception is the finding
        assert report["unsupported"][f"int8-fp32: {label}"].startswith("unsupported: ")
