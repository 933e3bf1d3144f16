"""capturable=True (fastopt/capture.py) on the CPU: the CuPy backend's kernels run by the CUDA emulation
(tests/gpu/cuda_emulator.py). An optimizer whose step reads its scalars from the device row that
fo_select_scalars picked must equal capturable=False bit for bit, step after step, for every registry
optimizer the class runs (two groups, a schedule, float32 and float64 buckets, clip + skip with a NaN
step); steps past the rows are not taken and reported; capturing (a stream marked as capturing in the
stand-in) before the kernel variant settles, or with rows to make, raises before anything is written.
The graph replay and state dicts (device-to-host copies the stand-in lacks) need a GPU:
tests/gpu/test_gpu_execution.py."""
from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest

import fastopt
from fastopt import capture, specs
from fastopt.backends import cuda_source, cupy_backend
from test_cupy_launch_abi import use_cupy

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the emulated kernels are built with g++ for x86-64")

SHAPES = [(5,), (300,), (3, 4), (0,), (9,)]
DTYPES = [np.float32, np.float32, np.float64, np.float32, np.float64]
_modules: dict = {}  # the backend's compiled modules, kept for the whole run


@pytest.fixture(scope="module")
def emu():
    import cuda_emulator
    return cuda_emulator.EmuCupy()  # one for the module: its compiled modules record launches in it


@pytest.fixture
def cp(emu, monkeypatch):
    emu.launches.clear()
    emu.capturing.clear()
    monkeypatch.setattr(cuda_source, "IN_FLIGHT", 1)
    use_cupy(monkeypatch, emu, _modules)  # compiled once per dtype for the whole run
    monkeypatch.setattr(capture, "MAX_ROWS", 64)  # small tables: the steady end and the overflow are reached
    monkeypatch.setattr(capture, "STEADY", 4)
    return emu


CLASS_OPTIMIZERS = [name for name, spec in specs.REGISTRY.items() if spec.tensor_coefs is None]
# schedule-free states start as a copy of the param (arrays.copy_into knows CuPy by its module, not the
# stand-in's): run on the GPU only (test_gpu_execution.py)
EMULATED = [name for name in CLASS_OPTIMIZERS if not specs.get_spec(name).train_eval]
OPTIONS = {"sgd": dict(lr=0.05, momentum=0.9), "adagrad": dict(lr_decay=0.01)}


def _pair(cp, name, seed, clip_skip=True, **extra):
    """Two optimizers of `name` on equal device arrays, capturable=True and False."""
    spec = specs.get_spec(name)
    cls = getattr(fastopt, spec.class_name)
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, DTYPES)]
    hp = {h.name: 0.01 for h in spec.hypers if h.default is specs.REQUIRED}
    hp.update(OPTIONS.get(name, {}))
    hp.update(extra)
    out = []
    for capturable in (True, False):
        params = [cp.from_host(h) for h in host]
        schedule = fastopt.schedules.exponential_decay(hp.get("lr", 1e-3), 0.9)
        options = dict(clip_grad_norm=1.0, skip_nonfinite=True) if clip_skip else {}
        opt = cls([{"params": params[:2], "lr": schedule}, {"params": params[2:]}], **hp, capturable=capturable,
                  **options)
        out.append((opt, params))
    return out


def _live(opt, params):
    return [p.get().tobytes() for p in params] + [
        a.get().tobytes() for i in range(len(params)) for a in opt.state_arrays(i).values()]


@pytest.mark.parametrize("name", EMULATED)
def test_capturable_equals_eager_bit_for_bit(cp, name):
    (cap, cap_params), (ref, ref_params) = _pair(cp, name, seed=hash(name) % 1000)
    assert cap.capturable and not ref.capturable
    rng = np.random.default_rng(7)
    for t in range(1, 9):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, DTYPES)]
        if t == 3:
            grads[2].flat[0] = np.nan  # skipped by both (steps counted as attempted on the GPU)
        cap.step([cp.from_host(g) for g in grads])
        ref.step([cp.from_host(g) for g in grads])
        assert _live(cap, cap_params) == _live(ref, ref_params), f"{name}: step {t} differs"
    assert cap.steps(0) == ref.steps(0) == 8 and cap.steps(1) == 8
    assert cap.skipped_steps == ref.skipped_steps == 1
    launched = [launch.name for launch in cp.launches]
    assert launched.count("fo_select_scalars") == 8


def test_rows_are_the_specs_scalars_and_end_when_steady():
    spec = specs.get_spec("adam")
    hp = dict(spec.defaults, lr=1e-3)
    rows, steady, variant, settled = capture.scalar_rows(spec, hp, 1e-3, base=0, max_rows=50_000)
    assert steady and 30_000 < len(rows) < 50_000  # 1 - 0.999**t reaches 1.0 in float64 near step 36,700
    for t in (1, 2, 17, len(rows)):
        expected = spec.scalars(hp, t, 1.0)
        assert rows[t - 1][:len(expected)].tobytes() == np.array(expected).tobytes()
        assert rows[t - 1][specs.LR_SLOT] == 1e-3
    assert np.array(spec.scalars(hp, 10 ** 7, 1.0)).tobytes() == rows[-1][:len(expected)].tobytes()
    sgd = specs.get_spec("sgd")
    hp = dict(sgd.defaults, lr=0.1, momentum=0.9)
    _, steady, variant, settled = capture.scalar_rows(sgd, hp, 0.1, base=0, max_rows=600)
    assert steady and settled == 2 and variant == sgd.variant(hp, 2) != sgd.variant(hp, 1)
    adagrad = specs.get_spec("adagrad")
    hp = dict(adagrad.defaults, lr=0.1, lr_decay=0.01)
    rows, steady, _, _ = capture.scalar_rows(adagrad, hp, 0.1, base=5, max_rows=300)
    assert not steady and len(rows) == 300
    assert rows[0][:2].tobytes() == np.array(adagrad.scalars(hp, 6, 1.0))[:2].tobytes()


def test_every_spec_fits_a_row():
    for name in CLASS_OPTIMIZERS:
        spec = specs.get_spec(name)
        hp = dict(spec.defaults, **{h.name: 0.01 for h in spec.hypers if h.default is specs.REQUIRED})
        assert len(spec.scalars(hp, 1, 1.0)) <= specs.LR_SLOT, name


def test_steps_past_the_rows_are_not_taken_and_reported(cp, monkeypatch):
    (cap, cap_params), (ref, ref_params) = _pair(cp, "adagrad", seed=3, clip_skip=False)
    rng = np.random.default_rng(8)
    grads = [[rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, DTYPES)] for _ in range(70)]
    for g in grads[:64]:
        cap.step([cp.from_host(x) for x in g])
        ref.step([cp.from_host(x) for x in g])
    assert _live(cap, cap_params) == _live(ref, ref_params)
    before = _live(cap, cap_params)
    cap.step([cp.from_host(x) for x in grads[64]])  # past the 64 rows of a table that never settles
    assert _live(cap, cap_params) == before, "a step past the rows wrote"
    with pytest.raises(RuntimeError, match="refresh_capture"):
        cap.steps(0)
    with pytest.raises(RuntimeError, match="refresh_capture"):
        cap.state_dict()
    cap.refresh_capture()
    assert cap.steps(0) == ref.steps(0) == 64
    with monkeypatch.context() as m:  # the rows re-based by refresh_capture serve: no read of the counters
        m.setattr(capture, "_host", lambda a: pytest.fail("a step after refresh_capture synchronised"))
        cap.step([cp.from_host(x) for x in grads[65]])
    ref.step([cp.from_host(x) for x in grads[65]])
    assert _live(cap, cap_params) == _live(ref, ref_params)
    for g in grads[66:]:
        cap.step([cp.from_host(x) for x in g])
        ref.step([cp.from_host(x) for x in g])
        assert _live(cap, cap_params) == _live(ref, ref_params)


def test_capture_rules(cp):
    (cap, params), _ = _pair(cp, "sgd", seed=4, clip_skip=False)
    grads = [cp.from_host(np.ones(s, d)) for s, d in zip(SHAPES, DTYPES)]
    stream = cp.cuda.get_current_stream(0)
    cp.capturing.add(stream.ptr)
    with pytest.raises(RuntimeError, match="before capturing"):  # the first step uploads tables and rows
        cap.step(grads)
    cp.capturing.clear()
    cap.step(grads)  # step 1: SGD's first momentum step is another kernel, settled from step 2 on
    cp.capturing.add(stream.ptr)
    cap.step(grads)
    cp.capturing.clear()
    (radam, radam_params), _ = _pair(cp, "radam", seed=4, clip_skip=False)
    radam.step(grads)
    radam.step(grads)
    before, launched = _live(radam, radam_params), len(cp.launches)
    cp.capturing.add(stream.ptr)
    with pytest.raises(RuntimeError, match="changes with the step until step 6.*up to step 5 before capturing"):
        radam.step(grads)  # RAdam rectifies from step 6 with beta2 = 0.999
    assert len(cp.launches) == launched  # refused in the validation phase: not even the row selection ran
    assert _live(radam, radam_params) == before
    cp.capturing.clear()
    cap.param_groups[1]["lr"] = 0.5  # new values: rows made again, which a capture cannot do
    cap.step(grads)
    cap.param_groups[1]["lr"] = 0.25
    cp.capturing.add(stream.ptr)
    with pytest.raises(RuntimeError, match="outside a\\s+CUDA graph capture"):
        cap.step(grads)
    cp.capturing.clear()


def test_refusals():
    import cuda_emulator
    with pytest.raises(ValueError, match="capturable=True"):
        fastopt.LARS([cuda_emulator.EmuCupy().from_host(np.ones(3, np.float32))], lr=0.1, capturable=True)
    with pytest.raises(ValueError, match="GPU arrays"):
        fastopt.Adam([np.ones(3, np.float32)], capturable=True)
    with pytest.raises(ValueError, match="capturable=True with stochastic_rounding=True"):
        fastopt.Adam([cuda_emulator.EmuCupy().from_host(np.ones(3, np.float16))], capturable=True,
                     stochastic_rounding=True)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        fastopt.Adam([np.ones(3, np.float32)], capturable=1)


@pytest.mark.parametrize("name", ["adam", "lamb", "sgd"])
@pytest.mark.parametrize("capturable", [False, True])
def test_static_gradient_buffers_equal_fresh_gradients(cp, name, capturable):
    """The usual loop of a captured or steady step: the same gradient arrays every step, their values
    rewritten. The second step on gets the checked calls and launch set-up of the first back
    (validate.bind_grads, the backend's memo), and must still equal fresh gradient arrays bit for bit."""
    (fast, fast_params), (ref, ref_params) = _pair(cp, name, seed=12)
    if capturable != fast.capturable:
        (fast, fast_params), (ref, ref_params) = (ref, ref_params), (fast, fast_params)
    rng = np.random.default_rng(9)
    static = [cp.from_host(np.zeros(s, d)) for s, d in zip(SHAPES, DTYPES)]
    for t in range(6):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, DTYPES)]
        for buffer, g in zip(static, grads):
            buffer.set(g)
        fast.step(static)
        ref.step([cp.from_host(g) for g in grads])
        assert _live(fast, fast_params) == _live(ref, ref_params), f"{name}: step {t + 1} differs"


def test_a_backend_that_cannot_capture_is_refused_before_anything_runs(cp):
    """The backend is resolved at each step (use_backend, FASTOPT_BACKEND): a capturable optimizer whose step
    would go to Numba raises in the validation phase: no launch (not the guard's either), no param, state,
    step count or hyperparameter taken; the next cupy step equals a reference that never saw the refusal."""
    (cap, params), (ref, ref_params) = _pair(cp, "adam", seed=21)
    grads = [cp.from_host(np.full(s, 0.5, d)) for s, d in zip(SHAPES, DTYPES)]
    cap.step(grads)
    ref.step(grads)
    before = _live(cap, params)
    cap.param_groups[1]["weight_decay"] = 0.5  # a change the refused step must not commit
    emu_launches = len(cp.launches)
    with fastopt.use_backend("numba"), pytest.raises(TypeError, match="capturable=True needs a backend.*'numba'"):
        cap.step(grads)
    assert len(cp.launches) == emu_launches
    assert _live(cap, params) == before and cap.steps(0) == cap.steps(1) == 1
    for opt in (cap, ref):
        opt.param_groups[1]["weight_decay"] = 0.25
        opt.step(grads)
    assert _live(cap, params) == _live(ref, ref_params)
