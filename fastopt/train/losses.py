"""Losses and weight penalties, each returning (loss, gradient) so the backward pass needs no autograd.

Losses take the model's raw outputs (predictions for MSE, logits for the cross-entropies), average
over the batch, and return the loss as a 0-d array (no host synchronisation on the GPU) together
with d loss / d outputs. The cross-entropies work on logits so that they are numerically stable:
binary cross-entropy through softplus, softmax cross-entropy through log-sum-exp.
"""
from __future__ import annotations

from fastopt.train.arrays import array_module


def mse(pred, target):
    """0.5-free mean squared error: mean over samples and outputs of (pred - target)^2."""
    xp = array_module(pred)
    diff = pred - target.reshape(pred.shape)
    loss = xp.mean(diff * diff)
    return loss, diff * (2.0 / diff.size)


def binary_cross_entropy(logits, target):
    """Mean BCE of sigmoid(logits) against 0/1 targets, computed as softplus(z) - y z:
    log(1 + e^z) = max(z, 0) + log1p(e^-|z|) never overflows."""
    xp = array_module(logits)
    y = target.reshape(logits.shape).astype(logits.dtype, copy=False)
    softplus = xp.maximum(logits, 0) + xp.log1p(xp.exp(-xp.abs(logits)))
    loss = xp.mean(softplus - y * logits)
    return loss, (sigmoid(logits) - y) / logits.shape[0]


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels, via log-sum-exp: subtracting
    the row maximum keeps exp() <= 1, so large logits neither overflow nor lose the small terms."""
    xp = array_module(logits)
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    labels = labels.astype(xp.int64, copy=False)
    loss = xp.mean(xp.log(sum_exp[:, 0]) - shifted[rows, labels])
    grad = exp / sum_exp
    grad[rows, labels] -= 1.0
    grad /= n
    return loss, grad


def sigmoid(z):
    """Logistic function without overflow for large |z| (exp of a non-positive number only)."""
    xp = array_module(z)
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def softmax(logits):
    xp = array_module(logits)
    e = xp.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def l2_penalty(weights, strength, grad_out=None):
    """0.5 * strength * ||w||^2; adds strength * w into grad_out (in place) when given."""
    xp = array_module(weights)
    if grad_out is not None:
        grad_out += strength * weights
    return 0.5 * strength * xp.sum(weights * weights)


def l1_penalty(weights, strength, grad_out=None):
    """strength * ||w||_1; adds the subgradient strength * sign(w) (0 at 0) into grad_out when given."""
    xp = array_module(weights)
    if grad_out is not None:
        grad_out += strength * xp.sign(weights)
    return strength * xp.sum(xp.abs(weights))

