"""Hand-written backward passes against central finite differences, in float64."""
import numpy as np
import pytest

from fastopt.train import losses
from fastopt.train.models import MLP, DenseNetwork, LinearRegression, LogisticRegression


def numeric_gradient(model, X, y, indices, h=1e-6, dropout_seed=123):
    """d objective / d params[i] by central differences; dropout masks replayed from one seed."""
    grad = np.empty(len(indices))
    for k, i in enumerate(indices):
        saved = model.params[i]
        model.params[i] = saved + h
        model.reseed_dropout(dropout_seed)
        up = float(model.loss_and_grad(X, y))
        model.params[i] = saved - h
        model.reseed_dropout(dropout_seed)
        down = float(model.loss_and_grad(X, y))
        model.params[i] = saved
        grad[k] = (up - down) / (2 * h)
    return grad


def check_gradients(model, X, y, max_checked=300, dropout_seed=123):
    rng = np.random.default_rng(0)
    # random non-zero parameters: zeros-initialised models would hide bugs (and the L1 kink sits at 0)
    model.params[:] = rng.normal(0.0, 0.5, size=model.n_params)
    model.reseed_dropout(dropout_seed)
    model.loss_and_grad(X, y)
    analytic = model.grads.copy()
    indices = np.arange(model.n_params)
    if len(indices) > max_checked:
        indices = np.sort(rng.choice(indices, max_checked, replace=False))
    numeric = numeric_gradient(model, X, y, indices, dropout_seed=dropout_seed)
    np.testing.assert_allclose(analytic[indices], numeric, rtol=1e-5, atol=1e-7)
    assert np.abs(analytic).max() > 1e-3  # a test of all-zero gradients would prove nothing


@pytest.fixture
def batch():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(13, 5))
    return X, rng


def test_linear_regression_gradient_with_penalties(batch):
    X, rng = batch
    model = LinearRegression(5, l1=0.03, l2=0.1, dtype=np.float64)
    check_gradients(model, X, rng.normal(size=13))


def test_multi_output_regression_gradient(batch):
    X, rng = batch
    model = DenseNetwork([5, 3], task="regression", dtype=np.float64)
    check_gradients(model, X, rng.normal(size=(13, 3)))


def test_binary_logistic_gradient(batch):
    X, rng = batch
    model = LogisticRegression(5, 2, l2=0.05, dtype=np.float64)
    check_gradients(model, X, rng.integers(0, 2, size=13))


def test_multinomial_logistic_gradient(batch):
    X, rng = batch
    model = LogisticRegression(5, 4, l1=0.02, dtype=np.float64)
    check_gradients(model, X, rng.integers(0, 4, size=13))


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_mlp_gradient_each_activation(batch, activation):
    X, rng = batch
    model = MLP(5, (7, 6), 3, activation=activation, l2=0.01, dtype=np.float64)
    check_gradients(model, X, rng.integers(0, 3, size=13))


def test_mlp_gradient_with_dropout(batch):
    X, rng = batch
    model = MLP(5, (8,), 3, activation="tanh", dropout=0.5, dtype=np.float64)
    check_gradients(model, X, rng.integers(0, 3, size=13))


def test_mlp_regression_gradient(batch):
    X, rng = batch
    model = MLP(5, (6,), 1, task="regression", activation="tanh", dtype=np.float64)
    check_gradients(model, X, rng.normal(size=13))


def test_dropout_masks_change_the_gradient_between_steps(batch):
    X, rng = batch
    y = rng.integers(0, 3, size=13)
    model = MLP(5, (16,), 3, dropout=0.5, dtype=np.float64)
    model.loss_and_grad(X, y)
    first = model.grads.copy()
    model.loss_and_grad(X, y)
    assert not np.allclose(first, model.grads)  # a new mask each step
    # and inference ignores dropout: deterministic outputs
    np.testing.assert_array_equal(model.outputs(X), model.outputs(X))


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]])
    loss, grad = losses.softmax_cross_entropy(logits, np.array([0, 2]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, 1000.0 / 2, rtol=1e-12)  # sample 2 is 1000 nats off, sample 1 exact


def test_binary_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[800.0], [-800.0], [800.0]])
    loss, grad = losses.binary_cross_entropy(logits, np.array([1, 0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, 800.0 / 3, rtol=1e-12)


def test_bce_matches_its_definition():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(9, 1))
    y = rng.integers(0, 2, size=9)
    p = 1 / (1 + np.exp(-z[:, 0]))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(losses.binary_cross_entropy(z, y)[0], expected, rtol=1e-12)


def test_penalties_values():
    w = np.array([[1.0, -2.0], [0.0, 3.0]])
    g = np.zeros_like(w)
    assert losses.l2_penalty(w, 0.5, g) == pytest.approx(0.5 * 0.5 * 14.0)
    np.testing.assert_allclose(g, 0.5 * w)
    g[:] = 0
    assert losses.l1_penalty(w, 0.1, g) == pytest.approx(0.6)
    np.testing.assert_allclose(g, 0.1 * np.sign(w))


def test_biases_are_not_penalised():
    model = LinearRegression(2, l2=1.0, dtype=np.float64)
    model.params[:] = [0.0, 0.0, 5.0]  # w = 0, b = 5
    X, y = np.zeros((4, 2)), np.full(4, 5.0)
    assert float(model.loss_and_grad(X, y)) == pytest.approx(0.0)
