"""The precision modes of the CuPy backend (state_dtype= incl. "int8", bfloat16 params, kahan=True, stochastic_rounding=True)
on a real GPU: the same checks as tests/gpu/test_precision_emulation.py (the optimizer classes on CuPy arrays
equal the CPU classes bit for bit, step after step), run by NVRTC's code on the device instead of the CUDA
emulation. Skipped without a CUDA GPU (the `cp` fixture of tests/conftest.py); the bfloat16 cases need CuPy's
bfloat16 arrays (CuPy 14 with ml_dtypes)."""
from __future__ import annotations

import numpy as np
import pytest

import test_precision_emulation as emulated
from fastopt.backends import cuda_source


def _needs_bfloat16(cp, case):
    if "bfloat16" not in case:
        return
    try:
        cp.asarray(np.zeros(2, cuda_source.BF16))
    except Exception as e:  # no ml_dtypes (BF16 None) or a CuPy without bfloat16 arrays
        pytest.skip(f"CuPy has no bfloat16 arrays here ({type(e).__name__}: {e})")


@pytest.mark.parametrize("case", emulated.CASES, ids=lambda c: f"{c[0]} params, {c[1] or 'default'} state")
@pytest.mark.parametrize("name", emulated.NAMES)
def test_device_class_equals_the_cpu_class_bit_for_bit(cp, name, case):
    _needs_bfloat16(cp, case)
    emulated.test_device_class_equals_the_cpu_class_bit_for_bit(cp, name, case)


@pytest.mark.parametrize("mode", ["kahan", "stochastic_rounding"])
@pytest.mark.parametrize("case", emulated.ROUNDINGS, ids=lambda c: f"{c[0]} params, {c[1] or 'default'} state")
@pytest.mark.parametrize("name", emulated.ROUNDED)
def test_device_class_rounds_as_the_cpu_class(cp, name, case, mode):
    _needs_bfloat16(cp, case)
    emulated.test_device_class_rounds_as_the_cpu_class(cp, name, case, mode)


@pytest.mark.parametrize("case", emulated.INT8_CASES, ids=lambda c: f"{c[0]} params{', ' + c[1] if c[1] else ''}")
@pytest.mark.parametrize("name", emulated.INT8_NAMES)
def test_device_class_with_8bit_state_equals_the_cpu_class(cp, name, case):
    _needs_bfloat16(cp, case)
    emulated.test_device_class_with_8bit_state_equals_the_cpu_class(cp, name, case)


def test_8bit_device_state_dict_round_trip(cp):
    emulated.check_8bit_device_state_dict_round_trip(cp)


def test_refusals(cp):
    emulated.test_refusals(cp)


@pytest.mark.parametrize("pdtype", ["float16", "bfloat16"])
def test_kahan_steps_read_capturable_scalars_as_eager_ones(cp, pdtype, monkeypatch):
    _needs_bfloat16(cp, (pdtype,))
    emulated.test_kahan_steps_read_capturable_scalars_as_eager_ones(cp, pdtype, monkeypatch)


@pytest.mark.parametrize("pdtype", ["float32", "bfloat16"])
def test_8bit_steps_read_capturable_scalars_as_eager_ones(cp, pdtype, monkeypatch):
    _needs_bfloat16(cp, (pdtype,))
    emulated.test_8bit_steps_read_capturable_scalars_as_eager_ones(cp, pdtype, monkeypatch)
