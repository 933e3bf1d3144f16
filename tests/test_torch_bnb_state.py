"""Optimizer state between bitsandbytes' 8-bit optimizers and torch.optim / fastopt.torch (fastopt.torch.bnb_state,
issue 13 Deliver 5). Without bitsandbytes: its state-dict layouts (nested from 0.45, flat before) built by hand
dequantize to qmap[code] * absmax exactly, small params' float32 states pass through, the quantizer picks the
nearest map value (ties to the lower) and the block's max |x|, and bad input is named. With bitsandbytes
installed: its Adam8bit's state converts exactly (its own dequantize_blockwise), loads into torch.optim and
fastopt.torch (which then step alike), our quantizer gives its quantize_blockwise's scales and codes (but where its
CPU path takes a farther neighbour), and a converted fastopt.torch 8-bit state loads into bitsandbytes and trains
on."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt.precision import dynamic_map  # noqa: E402
from fastopt.torch import bnb_state  # noqa: E402
from tests.torch_support import step_alike  # noqa: E402


def _bnb_entry(rng, n, nested=True, block=256):
    codes = torch.from_numpy(rng.integers(0, 256, n).astype(np.uint8))
    absmax = torch.from_numpy(rng.random(-(-n // block)).astype(np.float32))
    qmap = torch.from_numpy(dynamic_map(True).copy())
    quant = {"state1": codes, "qmap1": qmap, "absmax1": absmax,
             "state2": codes.flip(0).clone(), "qmap2": torch.from_numpy(dynamic_map(False).copy()), "absmax2": absmax * 2}
    return ({"step": 7, bnb_state.QUANT_KEY: quant} if nested else {"step": 7, **quant}), quant


@pytest.mark.parametrize("nested", [True, False], ids=["nested (0.45+)", "flat"])
def test_from_bitsandbytes_dequantizes_exactly(nested):
    rng = np.random.default_rng(3)
    entry, quant = _bnb_entry(rng, 5000, nested)
    small = {"step": 7, "state1": torch.randn(10), "state2": torch.rand(10)}
    sd = {"state": {0: entry, 1: small}, "param_groups": [{"lr": 1e-3, "params": [0, 1], "alpha": 0.0}]}
    out = bnb_state.from_bitsandbytes(sd, "AdamW")
    m, v = out["state"][0]["exp_avg"], out["state"][0]["exp_avg_sq"]
    block = np.repeat(quant["absmax1"].numpy(), 256)[:5000]
    np.testing.assert_array_equal(m.numpy(), dynamic_map(True)[quant["state1"].numpy()] * block)
    np.testing.assert_array_equal(v.numpy(), dynamic_map(False)[quant["state2"].numpy()] * block * 2)
    assert out["state"][0]["step"].dtype == torch.float32 and float(out["state"][0]["step"]) == 7.0
    assert torch.equal(out["state"][1]["exp_avg"], small["state1"]) and out["state"][1]["exp_avg"] is not small["state1"]
    assert out["param_groups"] == sd["param_groups"] and out["param_groups"][0] is not sd["param_groups"][0]


def test_block_size_is_read_from_the_scales_and_bad_input_is_named():
    rng = np.random.default_rng(4)
    codes = torch.from_numpy(rng.integers(0, 256, 1000).astype(np.uint8))
    qmap = torch.linspace(-1, 1, 256)
    for block in (64, 2048):
        absmax = torch.rand(-(-1000 // block))
        got = bnb_state.dequantize(codes, qmap, absmax)
        assert torch.equal(got, qmap[codes.long()] * absmax.repeat_interleave(block)[:1000])
    with pytest.raises(ValueError, match="3 scales do not fit 1000 codes"):
        bnb_state.dequantize(codes, qmap, torch.ones(3))
    with pytest.raises(ValueError, match="codes must be uint8"):
        bnb_state.dequantize(codes.int(), qmap, torch.ones(4))
    with pytest.raises(ValueError, match="optimizer must be one of adagrad, adam, adamw, lion, rmsprop, sgd, got 'lamb'"):
        bnb_state.from_bitsandbytes({"state": {}, "param_groups": []}, "lamb")
    with pytest.raises(ValueError, match="exp_avg must be a float tensor"):
        bnb_state.to_bitsandbytes({"state": {0: {"exp_avg": torch.zeros(3, dtype=torch.uint8)}}, "param_groups": []},
                                  "lion", maps={"signed": qmap, "unsigned": qmap})


def test_quantize_takes_the_nearest_map_value_and_the_block_maximum():
    rng = np.random.default_rng(5)
    qmap = torch.from_numpy(dynamic_map(True).copy())
    x = torch.from_numpy((rng.standard_normal(3000) * np.exp(rng.standard_normal(3000))).astype(np.float32))
    x[:256] = 0.0  # an all-zero block: scale 1, zero's code
    codes, absmax = bnb_state.quantize(x, qmap)
    blocks = torch.zeros(12 * 256)
    blocks[:3000] = x
    want_absmax = blocks.reshape(12, 256).abs().amax(1)
    assert torch.equal(absmax, want_absmax)
    scale = torch.where(want_absmax > 0, want_absmax, torch.ones(12)).repeat_interleave(256)[:3000]
    normalized = (x / scale).double()
    distance = (qmap.double()[None, :] - normalized[:, None]).abs()
    nearest = distance.argmin(1)  # the first (lower) of two equally near values
    assert torch.equal(codes.long(), nearest)


def test_to_bitsandbytes_layout_without_bitsandbytes():
    maps = {"signed": torch.from_numpy(dynamic_map(True).copy()), "unsigned": torch.from_numpy(dynamic_map(False).copy())}
    sd = {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(5000), "exp_avg_sq": torch.rand(5000)},
                    1: {"step": torch.tensor(4.0), "exp_avg": torch.randn(7), "exp_avg_sq": torch.rand(7)}},
          "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}
    out = bnb_state.to_bitsandbytes(sd, "adam", template={"param_groups": [{"lr": 5.0, "alpha": 0.0, "params": []}]},
                                    maps=maps)
    big, small = out["state"][0], out["state"][1]
    assert big["step"] == 4 and isinstance(big["step"], int)
    q = big[bnb_state.QUANT_KEY]
    assert q["state1"].dtype == torch.uint8 and q["state1"].shape == (5000,) and q["absmax1"].shape == (20,)
    assert torch.equal(q["qmap2"], maps["unsigned"]) and torch.equal(q["qmap1"], maps["signed"])
    back = bnb_state.from_bitsandbytes(out, "adam")["state"][0]
    for name in ("exp_avg", "exp_avg_sq"):  # within half the map's widest spacing times the block's scale
        err = (back[name] - sd["state"][0][name]).abs().reshape(-1)
        scale = bnb_state.quantize(sd["state"][0][name], maps["signed" if name == "exp_avg" else "unsigned"])[1]
        assert bool((err <= 0.06 * scale.repeat_interleave(256)[:5000] + 1e-12).all()), name
    assert torch.equal(small[bnb_state.QUANT_KEY]["state1"], sd["state"][1]["exp_avg"])
    assert out["param_groups"] == [{"lr": 1e-3, "alpha": 0.0, "params": [0, 1]}]


def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb, pytest.importorskip("bitsandbytes.functional")


def test_bitsandbytes_adam8bit_state_moves_to_torch_and_fastopt_and_back():
    bnb, F = _bnb()
    torch.manual_seed(11)
    ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(3, 7))]
    opt = bnb.optim.Adam8bit(ps, lr=1e-3)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()
    sd = opt.state_dict()
    converted = bnb_state.from_bitsandbytes(sd, "adam")
    st = opt.state[ps[0]]
    for k, name in ((1, "exp_avg"), (2, "exp_avg_sq")):
        want = F.dequantize_blockwise(st[f"state{k}"], absmax=st[f"absmax{k}"], code=st[f"qmap{k}"], blocksize=256)
        assert torch.equal(converted["state"][0][name], want), name
        # the same scales as bitsandbytes' own quantizer; the same codes but where its CPU path (a lookup on a
        # 16-bit grid) takes a neighbour of the nearest map value: never nearer than ours
        x = torch.cat([want, torch.randn(20000) * torch.exp(torch.randn(20000))])
        codes, absmax = bnb_state.quantize(x, st[f"qmap{k}"])
        bnb_codes, bnb_quant = F.quantize_blockwise(x, code=st[f"qmap{k}"], blocksize=256)
        assert torch.equal(absmax, bnb_quant.absmax), name
        differ = codes != bnb_codes
        assert differ.float().mean() < 0.02, (name, int(differ.sum()))
        scale = absmax.repeat_interleave(256)[:x.numel()]
        qmap = st[f"qmap{k}"].double()
        ours = (qmap[codes.long()] - (x / scale).double()).abs()
        theirs = (qmap[bnb_codes.long()] - (x / scale).double()).abs()
        assert bool((ours <= theirs).all()), name
    # torch.optim and fastopt.torch take it, and step alike
    a = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ta, fb = torch.optim.Adam(a, lr=1e-3), ft.Adam(b, lr=1e-3)
    ta.load_state_dict(copy.deepcopy(converted))  # each its own step tensors (both step them in place)
    fb.load_state_dict(copy.deepcopy(converted))
    step_alike(ta, fb, 2)
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    # a fastopt.torch 8-bit optimizer's state (as float32, torch_state_dict) loads into bitsandbytes and trains on
    c = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fc = ft.AdamW(c, lr=1e-3, weight_decay=0.0, state_dtype="int8")
    for _ in range(3):
        for p in c:
            p.grad = torch.randn(p.shape)
        fc.step()
    target = bnb.optim.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in c], lr=1e-3, weight_decay=0.0)
    out = bnb_state.to_bitsandbytes(fc.torch_state_dict(), "adamw", template=target.state_dict())
    target.load_state_dict(out)
    d = target.param_groups[0]["params"]
    moved = bnb_state.from_bitsandbytes(target.state_dict(), "adamw")
    ours = fc.torch_state_dict()
    for i in range(2):
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moved["state"][i][name], ours["state"][i][name], rtol=0.1,
                                       atol=0.07 * float(ours["state"][i][name].abs().max()))
    for p in d:
        p.grad = torch.randn(p.shape)
    target.step()
    assert all(torch.isfinite(p).all() for p in d)
