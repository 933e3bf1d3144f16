"""Models trained by hand-written forward and backward passes: LinearRegression, LogisticRegression
(binary and multinomial) and MLP, all one class underneath (a stack of dense layers with a loss head).

Every parameter lives in ONE flat buffer (`model.params`) and every gradient in another
(`model.grads`); the per-layer weights and biases are views into them. The optimizer therefore sees a
single array, and an update step is a single fused kernel call over all parameters. The backward pass
writes gradients straight into the views (matmul(..., out=view)), so nothing is copied into place.

The array module (NumPy or CuPy) is the one given as `xp`; inputs must live on the same device.
Initial weights are drawn on the host from the seed, so a seed gives the same model on CPU and GPU.
"""
from __future__ import annotations

import numpy as np

import fastopt.train.losses as losses  # the module itself, not the package (whose __init__ imports this one)
from fastopt.train.arrays import array_module

TASKS = ("regression", "binary", "multiclass")
ACTIVATIONS = ("relu", "tanh", "sigmoid")
INITS = ("auto", "he", "xavier", "zeros")


def _activate(name, z):
    xp = array_module(z)
    if name == "relu":
        return xp.maximum(z, 0)
    if name == "tanh":
        return xp.tanh(z)
    return losses.sigmoid(z)


def _activation_grad(name, h):
    """d activation / d z, written in terms of the activation's output h (what the forward pass keeps)."""
    if name == "relu":
        return h > 0
    if name == "tanh":
        return 1.0 - h * h
    return h * (1.0 - h)


def _initial_weights(rng, fan_in, fan_out, init, activation):
    """He (normal, std sqrt(2 / fan_in)) suits relu; Xavier/Glorot (uniform, limit
    sqrt(6 / (fan_in + fan_out))) suits tanh and sigmoid. 'auto' picks by activation."""
    if init == "auto":
        init = "he" if activation == "relu" else "xavier"
    if init == "zeros":
        return np.zeros((fan_in, fan_out))
    if init == "he":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out))


class DenseNetwork:
    """Dense layers `sizes[0] -> sizes[1] -> ... -> sizes[-1]` with `activation` between them, inverted
    dropout after each hidden activation, and a loss head chosen by `task`:
    regression -> MSE, binary -> sigmoid + BCE (one output), multiclass -> softmax cross-entropy.
    `l1` / `l2` penalise the weights (not the biases), the usual convention."""

    def __init__(self, sizes, *, task="multiclass", activation="relu", dropout=0.0, init="auto", l1=0.0,
                 l2=0.0, seed=0, dtype=np.float32, xp=np):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least an input and an output size, all >= 1: {sizes}")
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; use one of {TASKS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; use one of {ACTIVATIONS}")
        if init not in INITS:
            raise ValueError(f"Unknown init {init!r}; use one of {INITS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout: {dropout} (a probability in [0, 1))")
        if l1 < 0 or l2 < 0:
            raise ValueError(f"Invalid penalty: l1={l1}, l2={l2} (must be >= 0)")
        if task == "binary" and sizes[-1] != 1:
            raise ValueError("a binary model has one output (the logit of the positive class)")
        self.sizes, self.task, self.activation, self.dropout = sizes, task, activation, float(dropout)
        self.l1, self.l2, self.seed, self.xp = float(l1), float(l2), seed, xp
        self.dtype = np.dtype(dtype)

        shapes = [(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        n_params = sum(a * b + b for a, b in shapes)
        host_rng = np.random.default_rng(seed)
        host = np.empty(n_params, dtype=self.dtype)
        offset = 0
        for fan_in, fan_out in shapes:
            host[offset:offset + fan_in * fan_out] = _initial_weights(
                host_rng, fan_in, fan_out, init, activation).ravel()
            offset += fan_in * fan_out
            host[offset:offset + fan_out] = 0.0
            offset += fan_out
        self.params = xp.asarray(host)
        self.grads = xp.zeros_like(self.params)
        self.weights, self.biases = self._views(self.params, shapes)
        self.weight_grads, self.bias_grads = self._views(self.grads, shapes)
        # dropout masks come from their own stream, seeded apart from the initial weights
        self._dropout_rng = xp.random.default_rng(np.random.SeedSequence([seed, 1]).generate_state(1)[0])

    @staticmethod
    def _views(flat, shapes):
        weights, biases, offset = [], [], 0
        for fan_in, fan_out in shapes:
            weights.append(flat[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out))
            offset += fan_in * fan_out
            biases.append(flat[offset:offset + fan_out])
            offset += fan_out
        return weights, biases

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    def reseed_dropout(self, seed):
        """Restart the dropout stream (gradient checks need the same masks on every evaluation)."""
        self._dropout_rng = self.xp.random.default_rng(seed)

    # ------------------------------------------------------------------ forward / backward
    def _forward(self, X, training):
        """Outputs, and what the backward pass needs: each layer's input, and per hidden layer its
        activation (before dropout) and dropout mask."""
        inputs, hidden, masks = [], [], []
        a = X
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            inputs.append(a)
            z = a @ W
            z += b
            if i == last:
                return z, inputs, hidden, masks
            h = _activate(self.activation, z)
            hidden.append(h)
            if training and self.dropout > 0.0:
                # inverted dropout: scale the kept units at training time so inference needs nothing
                keep = 1.0 - self.dropout
                mask = (self._dropout_rng.random(h.shape, dtype=self.dtype) < keep) * self.dtype.type(1.0 / keep)
                masks.append(mask)
                a = h * mask
            else:
                masks.append(None)
                a = h

    def _data_loss(self, outputs, y):
        if self.task == "regression":
            return losses.mse(outputs, y)
        if self.task == "binary":
            return losses.binary_cross_entropy(outputs, y)
        return losses.softmax_cross_entropy(outputs, y)

    def _penalty(self, with_grads):
        total = 0.0
        for W, gW in zip(self.weights, self.weight_grads):
            if self.l2:
                total = total + losses.l2_penalty(W, self.l2, gW if with_grads else None)
            if self.l1:
                total = total + losses.l1_penalty(W, self.l1, gW if with_grads else None)
        return total

    def loss_and_grad(self, X, y):
        """Training-mode forward (dropout on) and backward. Writes d objective / d params into
        `self.grads` and returns the objective (data loss + penalties) as a 0-d array."""
        xp = self.xp
        outputs, inputs, hidden, masks = self._forward(X, training=True)
        loss, delta = self._data_loss(outputs, y)
        delta = delta.astype(self.dtype, copy=False)
        for i in range(len(self.weights) - 1, -1, -1):
            xp.matmul(inputs[i].T, delta, out=self.weight_grads[i])
            delta.sum(axis=0, out=self.bias_grads[i])
            if i > 0:
                delta = delta @ self.weights[i].T
                if masks[i - 1] is not None:
                    delta *= masks[i - 1]
                delta *= _activation_grad(self.activation, hidden[i - 1])
        return loss + self._penalty(with_grads=True)

    def outputs(self, X):
        """Inference-mode outputs (no dropout): predictions for regression, logits otherwise."""
        return self._forward(X, training=False)[0]

    def loss(self, X, y):
        """Inference-mode data loss (without penalties) as a 0-d array."""
        return self._data_loss(self.outputs(X), y)[0]

    def data_loss(self, outputs, y):
        """Data loss (without penalties) of given outputs, as a 0-d array."""
        return self._data_loss(outputs, y)[0]

    def predict(self, X):
        """Regression: predictions, shape (n,) for one output. Binary: 0/1 labels. Multiclass: argmax."""
        return self.decode(self.outputs(X))

    def decode(self, out):
        """Predictions from raw outputs (so that one forward pass serves both loss and metrics)."""
        if self.task == "regression":
            return out[:, 0] if out.shape[1] == 1 else out
        if self.task == "binary":
            return (out[:, 0] > 0).astype(self.xp.int64)
        return out.argmax(axis=1)

    def predict_proba(self, X):
        out = self.outputs(X)
        if self.task == "binary":
            p = losses.sigmoid(out[:, 0])
            return self.xp.stack([1.0 - p, p], axis=1)
        if self.task == "multiclass":
            return losses.softmax(out)
        raise ValueError("predict_proba is for classifiers")

    # ------------------------------------------------------------------ snapshots (early stopping)
    def snapshot(self):
        """A copy of the parameters (one flat array)."""
        return self.params.copy()

    def restore(self, snapshot):
        """Copy a snapshot back in place: the views and the optimizer's reference stay valid."""
        self.params[...] = snapshot

    def describe(self) -> str:
        return f"{type(self).__name__}({'-'.join(map(str, self.sizes))}, {self.task}, {self.n_params} params)"


class LinearRegression(DenseNetwork):
    """y = X w + b with a mean-squared-error loss (optionally L1: lasso, L2: ridge)."""

    def __init__(self, n_features, n_outputs=1, *, l1=0.0, l2=0.0, seed=0, dtype=np.float32, xp=np):
        super().__init__([n_features, n_outputs], task="regression", init="zeros", l1=l1, l2=l2, seed=seed,
                         dtype=dtype, xp=xp)

    @property
    def coef_(self):
        return self.weights[0][:, 0] if self.sizes[-1] == 1 else self.weights[0]

    @property
    def intercept_(self):
        return self.biases[0][0] if self.sizes[-1] == 1 else self.biases[0]


class LogisticRegression(DenseNetwork):
    """Binary (n_classes=2: one logit, sigmoid + BCE) or multinomial (softmax cross-entropy)."""

    def __init__(self, n_features, n_classes=2, *, l1=0.0, l2=0.0, seed=0, dtype=np.float32, xp=np):
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        binary = n_classes == 2
        super().__init__([n_features, 1 if binary else n_classes], task="binary" if binary else "multiclass",
                         init="zeros", l1=l1, l2=l2, seed=seed, dtype=dtype, xp=xp)
        self.n_classes = n_classes


class MLP(DenseNetwork):
    """Multi-layer perceptron: n_features -> hidden_sizes... -> n_outputs. For classification
    n_outputs is the number of classes (2 classes still use a 2-way softmax); for regression use
    task='regression'."""

    def __init__(self, n_features, hidden_sizes=(128,), n_outputs=10, *, task="multiclass", activation="relu",
                 dropout=0.0, init="auto", l1=0.0, l2=0.0, seed=0, dtype=np.float32, xp=np):
        super().__init__([n_features, *hidden_sizes, n_outputs], task=task, activation=activation,
                         dropout=dropout, init=init, l1=l1, l2=l2, seed=seed, dtype=dtype, xp=xp)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
