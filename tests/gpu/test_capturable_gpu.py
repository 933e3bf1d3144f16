"""capturable=True on a GPU: the class step captured once into a CUDA graph (cupy.cuda.Graph) and replayed
equals eager capturable=False steps bit for bit (step counts, bias corrections and schedule advanced on the
device), with clip + skip and a NaN step, for every class optimizer; torch CUDA tensors on torch's stream;
state dicts. The stand-in for CI is tests/gpu/test_capturable.py (the CUDA emulation)."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import specs

pytestmark = pytest.mark.gpu

SHAPES = [(5,), (3000,), (3, 40), (0,), (9,), (70000,)]
DTYPES = [np.float32, np.float32, np.float64, np.float32, np.float64, np.float32]
NAMES = [name for name, spec in specs.REGISTRY.items() if spec.tensor_coefs is None]
OPTIONS = {"sgd": dict(lr=0.05, momentum=0.9), "adagrad": dict(lr_decay=0.01)}


def _make(cp, name, host, capturable):
    spec = specs.get_spec(name)
    hp = {h.name: 0.01 for h in spec.hypers if h.default is specs.REQUIRED}
    hp.update(OPTIONS.get(name, {}))
    params = [cp.asarray(h) for h in host]
    schedule = fastopt.schedules.exponential_decay(hp.get("lr", 1e-3), 0.9)
    opt = getattr(fastopt, spec.class_name)([{"params": params[:3], "lr": schedule}, {"params": params[3:]}],
                                            **hp, clip_grad_norm=1.0, skip_nonfinite=True, capturable=capturable)
    return opt, params


def _live(opt, params):
    return [p.get().tobytes() for p in params] + [
        a.get().tobytes() for i in range(len(params)) for a in opt.state_arrays(i).values()]


@pytest.mark.parametrize("name", NAMES)
def test_graph_replays_equal_eager_steps(cp, name):
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    host = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, DTYPES)]
    cap, cap_params = _make(cp, name, host, True)
    ref, ref_params = _make(cp, name, host, False)
    grads = [cp.zeros(s, d) for s, d in zip(SHAPES, DTYPES)]  # the graph's static gradient buffers
    steps = [[rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, DTYPES)] for _ in range(12)]
    steps[8][1][7] = np.nan  # a skipped step inside the replays
    stream = cp.cuda.Stream(non_blocking=True)
    warm = 6  # eager steps first: tables, rows, and the kernel variant settled (RAdam: step 6)
    with stream:
        for t in range(12):
            for g, h in zip(grads, steps[t]):
                g.set(h)
            if t < warm:
                cap.step(grads)
            elif t == warm:
                stream.synchronize()
                stream.begin_capture()
                cap.step(grads)
                graph = stream.end_capture()
                graph.launch(stream)  # capturing does not run the step: the first replay does
            else:
                graph.launch(stream)
            ref.step([cp.asarray(h) for h in steps[t]])
            stream.synchronize()
            assert _live(cap, cap_params) == _live(ref, ref_params), f"{name}: step {t + 1} differs"
    assert cap.steps(0) == ref.steps(0) == 12 and cap.steps(1) == 12
    assert cap.skipped_steps == ref.skipped_steps == 1
    # a state dict of the replayed optimizer loads into a fresh one that continues identically
    fresh, fresh_params = _make(cp, name, [p.get() for p in cap_params], False)
    fresh.load_state_dict(cap.state_dict())
    g = [cp.asarray(h) for h in steps[0]]
    with stream:
        graph.launch(stream)  # the graph reads `grads` (steps[11] still)
        fresh.step([cp.asarray(h) for h in steps[11]])
        stream.synchronize()
    assert [p.get().tobytes() for p in cap_params] == [p.get().tobytes() for p in fresh_params]
    del g


def test_torch_cuda_tensors_in_a_torch_graph():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for torch")
    rng = np.random.default_rng(1)
    host = [rng.standard_normal(s).astype(np.float32) for s in [(10,), (300, 7)]]
    params = [torch.tensor(h, device="cuda") for h in host]
    ref_params = [torch.tensor(h, device="cuda") for h in host]
    grads = [torch.zeros_like(p) for p in params]
    opt = fastopt.Adam(params, lr=1e-2, capturable=True)
    ref = fastopt.Adam(ref_params, lr=1e-2)
    s = torch.cuda.Stream()
    values = [[torch.tensor(rng.standard_normal(p.shape).astype(np.float32), device="cuda") for p in params]
              for _ in range(8)]
    with torch.cuda.stream(s):
        for g, v in zip(grads, values[0]):
            g.copy_(v)
        opt.step(grads)
        ref.step(values[0])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            opt.step(grads)
        for t in range(1, 8):
            for g, v in zip(grads, values[t]):
                g.copy_(v)
            graph.replay()
            ref.step(values[t])
    torch.cuda.synchronize()
    assert opt.steps(0) == 8
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
