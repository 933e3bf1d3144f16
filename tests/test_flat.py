"""fastopt.flatten: one buffer, views into it, and a step on the buffer equal to the list path."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.specs import REGISTRY

SHAPES = [(7,), (33, 5), (2, 3, 4), (1,), (0,), (1037,)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_share_the_buffer_and_copy_the_values(dtype, rng):
    arrays = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    originals = [a.copy() for a in arrays]
    flat = fastopt.flatten(arrays)
    assert flat.params.ndim == 1 and flat.params.size == sum(a.size for a in arrays)
    assert flat.params.dtype == dtype and flat.grad.dtype == dtype
    assert not flat.grad.any()
    for a, o, v, gv in zip(arrays, originals, flat.views, flat.grad_views):
        assert v.shape == a.shape and gv.shape == a.shape
        np.testing.assert_array_equal(v, o)
        assert np.shares_memory(v, flat.params) or v.size == 0
        assert np.shares_memory(gv, flat.grad) or gv.size == 0
        assert not np.shares_memory(v, a)
    flat.params[...] += 1.0  # writes through to every view
    for v, o in zip(flat.views, originals):
        np.testing.assert_array_equal(v, o + 1.0)
    for a, o in zip(arrays, originals):  # the inputs were copied, not modified
        np.testing.assert_array_equal(a, o)


# LAMB's and LARS's trust ratios are per array (spec.norms_per_tensor), so they are excluded from "flat equals list"
ELEMENTWISE = [s for s in REGISTRY.values() if not s.norms_per_tensor]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", ELEMENTWISE, ids=[s.name for s in ELEMENTWISE])
def test_flat_step_equals_list_step(spec, dtype, rng):
    arrays = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    flat = fastopt.flatten(arrays)
    cls = getattr(fastopt, spec.class_name)
    lr = 0.05 if spec.name == "sgd" else 1e-2
    flat_opt = cls([flat.params], lr=lr)
    list_opt = cls([a.copy() for a in arrays], lr=lr)
    for _ in range(5):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        flat.set_grads(grads)
        flat_opt.step([flat.grad])
        list_opt.step(grads)
    for v, p in zip(flat.views, list_opt.params):
        np.testing.assert_array_equal(v, p)


def test_grads_written_into_grad_views(rng):
    arrays = [rng.standard_normal(s) for s in SHAPES]
    flat = fastopt.flatten(arrays)
    for gv in flat.grad_views:
        gv[...] = 2.0
    np.testing.assert_array_equal(flat.grad, np.full(flat.grad.size, 2.0))


def test_flatten_errors(rng):
    a = rng.standard_normal(4)
    with pytest.raises(ValueError, match="non-empty list"):
        fastopt.flatten([])
    with pytest.raises(TypeError, match=r"arrays\[1\] has dtype float32 but arrays\[0\] has float64"):
        fastopt.flatten([a, a.astype(np.float32)])
    with pytest.raises(TypeError, match="flatten packs float16, bfloat16, float32 or float64"):
        fastopt.flatten([np.arange(3)])
    with pytest.raises(TypeError, match="native byte order"):  # no kernel takes '>f4'
        fastopt.flatten([a.astype(">f8")])
    with pytest.raises(TypeError, match=r"arrays\[1\]: flatten takes NumPy or CuPy arrays, got builtins.list"):
        fastopt.flatten([a, [1.0, 2.0]])
    flat = fastopt.flatten([a])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(5,\), expected \(4,\)"):
        flat.set_grads([np.zeros(5)])
    assert not flat.grad.any()


@pytest.mark.parametrize("bad, error, words", [
    (np.array(["a", "b", "c"]), TypeError, r"grads\[1\] has dtype <U1, which does not cast to the buffer's float32"),
    (np.ones(3, complex), TypeError, r"grads\[1\] has dtype complex128"),
    (np.ones(3, object), TypeError, r"grads\[1\] has dtype object"),
    ([1.0, 2.0, 3.0], TypeError, r"grads\[1\] must be a numpy array like the flat buffer, got builtins.list"),
    (np.ones(4, np.float32), ValueError, r"grads\[1\] has shape \(4,\), expected \(3,\)"),
])
def test_set_grads_checks_every_grad_before_the_first_copy(rng, bad, error, words):
    """A bad second grad used to raise after the first had been copied in (strings: a bare NumPy error)."""
    flat = fastopt.flatten([rng.standard_normal((2, 3)).astype(np.float32), np.ones(3, np.float32)])
    flat.grad[:] = 7.0
    with pytest.raises(error, match=words):
        flat.set_grads([np.ones((2, 3), np.float32), bad])
    assert (flat.grad == 7.0).all()
    with pytest.raises(TypeError, match="grads must be a list of arrays, one per param, got NoneType"):
        flat.set_grads(None)  # a bare "object of type 'NoneType' has no len()" before
    flat.set_grads([np.ones((2, 3)), np.arange(3)])  # float64 and integer grads cast in
    assert flat.grad.tolist() == [1.0] * 6 + [0.0, 1.0, 2.0]


@pytest.mark.parametrize("buffer", [np.float32, np.float64])
def test_bfloat16_grads_copy_into_a_wider_buffer_exactly(buffer, rng):
    """A bfloat16 model's grads into a float32 (or float64) master buffer: the cast is exact, taken as float16's
    (bfloat16 is ml_dtypes' kind 'V': it was refused as "does not cast")."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    flat = fastopt.flatten([np.zeros((2, 3), buffer), np.zeros(5, buffer)])
    grads = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in ((2, 3), (5,))]
    flat.set_grads(grads)
    assert flat.grad.tobytes() == np.concatenate([g.astype(buffer).ravel() for g in grads]).tobytes()


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_16bit_params_flatten_and_step_as_the_list(dtype_name, rng):
    """bfloat16 (ml_dtypes) and float16 params are params everywhere else, so flatten packs them too; float32
    grads copy in (rounded to the buffer's dtype) and the flat step equals the list step bit for bit."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(getattr(ml_dtypes, dtype_name) if dtype_name == "bfloat16" else np.float16)
    arrays = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    flat = fastopt.flatten([a.copy() for a in arrays])
    assert flat.params.dtype == dtype and flat.grad.dtype == dtype
    flat.set_grads([g.astype(dtype) for g in grads])  # grads of the buffer's own dtype (bfloat16 has kind 'V')
    assert flat.grad.tobytes() == np.concatenate([g.astype(dtype).ravel() for g in grads]).tobytes()
    flat.set_grads(grads)
    fastopt.Adam([flat.params], lr=1e-2).step([flat.grad])
    fastopt.Adam(arrays, lr=1e-2).step([g.astype(dtype) for g in grads])
    for a, v in zip(arrays, flat.views):
        assert v.tobytes() == a.tobytes()


def test_set_grads_reads_grads_in_the_buffer_before_writing_it(rng):
    """grad_views given in another order (or a slice of the buffer) were copied one by one: the second
    source had already been overwritten by the first copy ([3 4 5 3 4 5] for a swap)."""
    flat = fastopt.flatten([np.zeros(3), np.zeros(3), np.zeros(2)])
    values = rng.standard_normal(8)
    flat.grad[...] = values
    g0, g1, g2 = flat.grad_views
    flat.set_grads([g1, g0, g2])  # g2 is its own view: nothing to copy
    assert flat.grad.tolist() == values[[3, 4, 5, 0, 1, 2, 6, 7]].tolist()
    flat.grad[...] = values
    flat.set_grads([flat.grad[2:5], flat.grad[::-1][:3], flat.grad[:2]])
    assert flat.grad.tolist() == values[[2, 3, 4, 7, 6, 5, 0, 1]].tolist()
