"""Optimizer state between bitsandbytes' 8-bit optimizers and torch.optim / fastopt (issue 13, Deliver 5).

bitsandbytes keeps each state of a param as `state1` / `state2`: uint8 codes into a 256-value map (`qmap1` /
`qmap2`) times a float32 scale per block (`absmax1` / `absmax2`, blocks of consecutive elements; 256 for its
block-wise optimizers), or float32 for params under its `min_8bit_size` (4096 elements); from version 0.45 its
state_dict() nests those under "__bnb_optimizer_quant_state__" (older versions keep them flat; both are read).
The value of code c in block b is qmap[c] * absmax[b], exactly what fastopt's 8-bit state computes with its own
map (precision.QuantizedState), so:

    from_bitsandbytes(sd, "adam")  -> a torch.optim state dict (float32 "exp_avg", "exp_avg_sq", "step"): load it
                                      into torch.optim or any fastopt.torch class (with state_dtype="int8" it is
                                      quantized with fastopt's map at the next step)
    to_bitsandbytes(sd, "adam")    -> bitsandbytes' layout of a torch.optim state dict (fastopt.torch's
                                      torch_state_dict(), or state_dict() of a float-state optimizer): each state
                                      quantized block-wise with bitsandbytes' dynamic maps (its create_dynamic_map,
                                      the nearest map value per element), ready for its load_state_dict

Each conversion moves the values once through float32: from bitsandbytes exactly; to bitsandbytes with its
scales and the nearest value of its map (its own CPU quantizer, a lookup on a 16-bit grid, takes a farther
neighbour for under 1% of elements). The param groups pass through unchanged; `template` (the target
bitsandbytes optimizer's own state_dict()) supplies the group keys bitsandbytes adds (e.g. "alpha")."""
from __future__ import annotations

import numpy as np
import torch

# bitsandbytes' state slots per optimizer (its Optimizer2State / Optimizer1State), as torch.optim names them;
# the second moment-like states take its unsigned map
STATES = {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"), "lion": ("exp_avg",),
          "sgd": ("momentum_buffer",), "rmsprop": ("square_avg",), "adagrad": ("sum",)}
UNSIGNED = frozenset({"exp_avg_sq", "square_avg", "sum"})
QUANT_KEY = "__bnb_optimizer_quant_state__"
BLOCK = 256  # bitsandbytes' block size for its block-wise 8-bit optimizers


def _slots(optimizer: str) -> tuple:
    if not isinstance(optimizer, str) or optimizer.lower() not in STATES:
        raise ValueError(f"optimizer must be one of {', '.join(sorted(STATES))}, got {optimizer!r}")
    return STATES[optimizer.lower()]


def _entries(entry: dict) -> dict:
    """A bitsandbytes param state with its quantization tensors unnested (both layouts)."""
    flat = {k: v for k, v in entry.items() if k != QUANT_KEY}
    flat.update(entry.get(QUANT_KEY, {}))
    return flat


def dequantize(codes, qmap, absmax) -> torch.Tensor:
    """float32 values of bitsandbytes block-wise codes: qmap[code] * absmax[block], the block size read from the
    number of scales (a power of two from 64); codes' shape."""
    codes = torch.as_tensor(codes).detach().cpu()
    qmap = torch.as_tensor(qmap, dtype=torch.float32).detach().cpu().reshape(-1)
    absmax = torch.as_tensor(absmax, dtype=torch.float32).detach().cpu().reshape(-1)
    n = codes.numel()
    if codes.dtype != torch.uint8 or qmap.numel() != 256:
        raise ValueError(f"bitsandbytes 8-bit state: codes must be uint8 and the map 256 values, got {codes.dtype} "
                         f"and {qmap.numel()} values")
    block = next((b for b in (64, 128, 256, 512, 1024, 2048, 4096) if -(-n // b) == absmax.numel()), None)
    if block is None:
        raise ValueError(f"bitsandbytes 8-bit state: {absmax.numel()} scales do not fit {n} codes in blocks of 64 to "
                         f"4096")
    scale = absmax.repeat_interleave(block)[:n]
    return (qmap[codes.reshape(-1).long()] * scale).reshape(codes.shape)


def quantize(values, qmap, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 absmax per block) of float values in bitsandbytes' layout: per block of `block`
    elements the scale max |x|, each code the map value nearest x / scale (ascending map; a tie takes the lower)."""
    x = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
    qmap = torch.as_tensor(qmap, dtype=torch.float32).detach().cpu().reshape(-1)
    nblocks = -(-x.numel() // block)
    padded = torch.zeros(nblocks * block)
    padded[:x.numel()] = x
    absmax = padded.reshape(nblocks, block).abs().amax(dim=1) if nblocks else torch.zeros(0)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).repeat_interleave(block)[:x.numel()]
    mids = (qmap[:-1].double() + qmap[1:].double()) / 2
    codes = np.searchsorted(mids.numpy(), (x / scale).double().numpy(), side="left")
    return torch.from_numpy(codes.astype(np.uint8)).reshape(torch.as_tensor(values).shape), absmax


def from_bitsandbytes(state_dict: dict, optimizer: str = "adam") -> dict:
    """A torch.optim state dict (float32 states named as torch.optim names them, "step" a float32 tensor) from a
    bitsandbytes 8-bit optimizer's state_dict(); `optimizer`: adam, adamw, lion, sgd, rmsprop or adagrad."""
    names = _slots(optimizer)
    state = {}
    for index, entry in state_dict["state"].items():
        flat = _entries(entry)
        out = {}
        if "step" in flat:
            out["step"] = torch.tensor(float(flat["step"]), dtype=torch.float32)
        for k, name in enumerate(names, start=1):
            s = flat.get(f"state{k}")
            if s is None:
                continue
            if s.dtype == torch.uint8:
                out[name] = dequantize(s, flat[f"qmap{k}"], flat[f"absmax{k}"])
            else:  # a small param's state: float32 in bitsandbytes too
                out[name] = s.detach().to(torch.float32).clone()
        state[index] = out
    return {"state": state, "param_groups": [dict(g) for g in state_dict["param_groups"]]}


def to_bitsandbytes(state_dict: dict, optimizer: str = "adam", template: dict | None = None,
                    min_8bit_size: int = 4096, maps: dict | None = None) -> dict:
    """bitsandbytes' state_dict() layout of a torch.optim state dict (float states; 8-bit fastopt state: use
    fastopt.torch's torch_state_dict() first): states of params with at least `min_8bit_size` elements quantized
    block-wise (256) with bitsandbytes' dynamic maps, smaller ones float32, "step" an int. `template`: the target
    bitsandbytes optimizer's own state_dict(), whose param groups give the keys bitsandbytes adds. `maps`:
    {"signed": 256 values, "unsigned": 256 values} (ascending), default the installed bitsandbytes' own
    (create_dynamic_map)."""
    names = _slots(optimizer)
    if maps is None:
        import bitsandbytes.functional as bnbf  # its maps, from the installed version
        maps = {"signed": bnbf.create_dynamic_map(signed=True), "unsigned": bnbf.create_dynamic_map(signed=False)}
    maps = {True: torch.as_tensor(maps["signed"], dtype=torch.float32).cpu(),
            False: torch.as_tensor(maps["unsigned"], dtype=torch.float32).cpu()}
    state = {}
    for index, entry in state_dict["state"].items():
        out, quant = {}, {}
        if "step" in entry:
            out["step"] = int(float(entry["step"]))
        for k, name in enumerate(names, start=1):
            v = entry.get(name)
            if v is None:
                continue
            if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                raise ValueError(f"state of param {index}: {name} must be a float tensor (8-bit fastopt state: "
                                 f"convert with torch_state_dict() first)")
            if v.numel() >= min_8bit_size:
                qmap = maps[name not in UNSIGNED]
                codes, absmax = quantize(v, qmap)
                quant.update({f"state{k}": codes.to(v.device), f"qmap{k}": qmap.to(v.device),
                              f"absmax{k}": absmax.to(v.device)})
            else:
                quant[f"state{k}"] = v.detach().to(torch.float32).clone()
        if quant:
            out[QUANT_KEY] = quant
        state[index] = out
    groups = [dict(g) for g in state_dict["param_groups"]]
    if template is not None:
        groups = [{**t, **g} for t, g in zip(template["param_groups"], groups)]
    return {"state": state, "param_groups": groups}
