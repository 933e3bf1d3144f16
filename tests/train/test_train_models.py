"""Model construction: flat buffers, views, initialisation, seeding, validation."""
import numpy as np
import pytest

from fastopt.train.models import MLP, LinearRegression, LogisticRegression


def test_parameters_and_gradients_are_views_of_one_flat_buffer():
    model = MLP(4, (5, 3), 2)
    assert model.params.ndim == 1 and model.n_params == 4 * 5 + 5 + 5 * 3 + 3 + 3 * 2 + 2
    for W in model.weights + model.biases:
        assert np.shares_memory(W, model.params)
    for G in model.weight_grads + model.bias_grads:
        assert np.shares_memory(G, model.grads)
    model.params[:] = 0.0
    assert all(np.all(W == 0) for W in model.weights)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = MLP(8, (16,), 3, seed=4), MLP(8, (16,), 3, seed=4), MLP(8, (16,), 3, seed=5)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)


def test_he_and_xavier_scales():
    he = MLP(400, (400,), 2, activation="relu", seed=0)
    xavier = MLP(400, (400,), 2, activation="tanh", seed=0)
    assert np.std(he.weights[0]) == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    assert np.std(xavier.weights[0]) == pytest.approx(np.sqrt(2 / 800), rel=0.05)  # uniform: limit^2 / 3
    assert np.all(he.biases[0] == 0)


def test_restore_writes_in_place():
    model = MLP(3, (4,), 2)
    buffer = model.params
    snap = model.snapshot()
    model.params += 1.0
    model.restore(snap)
    assert model.params is buffer
    np.testing.assert_array_equal(model.params, snap)


def test_predictions_shapes_and_kinds():
    X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    assert LinearRegression(3).predict(X).shape == (6,)
    binary = LogisticRegression(3, 2)
    assert binary.sizes == [3, 1] and set(binary.predict(X)) <= {0, 1}
    np.testing.assert_allclose(binary.predict_proba(X).sum(axis=1), 1.0, rtol=1e-6)
    multi = LogisticRegression(3, 4)
    assert multi.sizes == [3, 4] and multi.predict(X).shape == (6,)


def test_float32_model_stays_float32():
    model = MLP(3, (4,), 2, dropout=0.3)
    X = np.ones((5, 3), np.float32)
    model.loss_and_grad(X, np.array([0, 1, 0, 1, 1]))
    assert model.params.dtype == np.float32 and model.grads.dtype == np.float32
    assert model.outputs(X).dtype == np.float32


@pytest.mark.parametrize("kwargs, message", [
    (dict(activation="gelu"), "activation"), (dict(dropout=1.0), "dropout"), (dict(init="orthogonal"), "init"),
    (dict(l2=-1.0), "penalty"), (dict(task="ranking"), "task"),
])
def test_bad_arguments_raise_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(3, (4,), 2, **kwargs)
