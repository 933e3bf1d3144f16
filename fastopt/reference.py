"""Plain-NumPy reference of every update: the test oracle, and the fallback backend.

Written from the published algorithms (torch.optim's "Algorithm" boxes; Zhuang et al. 2020 for
AdaBelief, You et al. 2019 for LAMB, Chen et al. 2023 for Lion), one array at a time, in place, in the
arrays' own dtype: pass float64 copies to get a float64 oracle for float32 data. Bias corrections and
schedules are computed here from the hyperparameters, independently of fastopt/specs.py.

Every scalar is a Python float, so NumPy keeps the arrays' dtype (a float32 array times a Python float
stays float32), and the operation order follows the kernels: on float64 data the compiled kernels
agree with this module bit for bit.
"""
from __future__ import annotations

import math

import numpy as np


def scaled_grad(g, grad_scale, maximize):
    """g * grad_scale, negated under maximize (the gradient every rule below starts from)."""
    scale = 1.0 if grad_scale is None else float(grad_scale)
    if maximize:
        scale = -scale
    return g * scale


def _store(dst, value):
    dst[...] = value


def sgd_step(p, g, momentum_buffer=None, *, lr=1e-3, step=1, momentum=0.0, dampening=0.0, nesterov=False,
             weight_decay=0.0, maximize=False, grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        if step == 1:
            buf = g.copy()
        else:
            buf = momentum * momentum_buffer + (1.0 - dampening) * g
        _store(momentum_buffer, buf)
        g = g + momentum * buf if nesterov else buf
    _store(p, p - lr * g)


def adagrad_step(p, g, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, maximize=False, grad_scale=None):
    # initial_accumulator_value is where state_sum starts (initial_state); a step does not read it
    g = scaled_grad(g, grad_scale, maximize)
    if weight_decay != 0:
        g = g + weight_decay * p
    clr = lr / (1.0 + (step - 1) * lr_decay)
    _store(state_sum, state_sum + g * g)
    std = np.sqrt(state_sum) + eps
    _store(p, p - clr * (g / std))


def rmsprop_step(p, g, square_avg, grad_avg=None, momentum_buffer=None, *, lr=1e-2, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, centered=False, maximize=False, grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    if weight_decay != 0:
        g = g + weight_decay * p
    _store(square_avg, alpha * square_avg + ((1.0 - alpha) * g) * g)  # torch's addcmul order
    if centered:
        _store(grad_avg, alpha * grad_avg + (1.0 - alpha) * g)
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum > 0:
        _store(momentum_buffer, momentum * momentum_buffer + g / avg)
        _store(p, p - lr * momentum_buffer)
    else:
        _store(p, p - lr * (g / avg))


def _adam(p, g, m, v, vmax, *, step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale,
          decoupled):
    g = scaled_grad(g, grad_scale, maximize)
    if decoupled:
        _store(p, p * (1.0 - lr * weight_decay))
    elif weight_decay != 0:
        g = g + weight_decay * p
    _store(m, beta1 * m + (1.0 - beta1) * g)
    _store(v, beta2 * v + (1.0 - beta2) * (g * g))
    if amsgrad:
        _store(vmax, np.maximum(vmax, v))  # NaN propagates, like torch.maximum
        second = vmax
    else:
        second = v
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    denom = np.sqrt(second) * (1.0 / bias_correction2 ** 0.5) + eps
    _store(p, p - (lr / bias_correction1) * (m / denom))


def adam_step(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled_weight_decay=False, maximize=False,
              grad_scale=None):
    # torch.optim.Adam(decoupled_weight_decay=True) is AdamW
    _adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
          weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
          decoupled=decoupled_weight_decay)


def adamw_step(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
               eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False, grad_scale=None):
    _adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
          weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, decoupled=True)


def _weight_decay(p, g, lr, weight_decay, decoupled):
    if decoupled:
        _store(p, p * (1.0 - lr * weight_decay))
        return g
    return g + weight_decay * p if weight_decay != 0 else g


_MU_LOOP_STEPS = 4096


def nadam_step(p, g, exp_avg, exp_avg_sq, *, step, lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    g = _weight_decay(p, g, lr, weight_decay, decoupled_weight_decay)
    mu, mu_next = (beta1 * (1.0 - 0.5 * 0.96 ** (i * momentum_decay)) for i in (step, step + 1))
    if step <= _MU_LOOP_STEPS:  # torch's running product, multiplied in step order
        mu_product = 1.0
        for i in range(1, step + 1):
            mu_product *= beta1 * (1.0 - 0.5 * 0.96 ** (i * momentum_decay))
    else:  # a loop of 2**40 steps would hang: the registry's closed-form continuation (tested against the loop)
        from fastopt.specs import nadam_mu_product
        mu_product = nadam_mu_product(beta1, momentum_decay, step)
    mu_product_next = mu_product * mu_next
    _store(exp_avg, beta1 * exp_avg + (1.0 - beta1) * g)
    _store(exp_avg_sq, beta2 * exp_avg_sq + (1.0 - beta2) * (g * g))
    denom = np.sqrt(exp_avg_sq * (1.0 / (1.0 - beta2 ** step))) + eps
    grad_coef = lr * (1.0 - mu) / (1.0 - mu_product)
    exp_avg_coef = lr * mu_next / (1.0 - mu_product_next)
    _store(p, p - (grad_coef * g + exp_avg_coef * exp_avg) / denom)


def radam_step(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               decoupled_weight_decay=False, maximize=False, grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    g = _weight_decay(p, g, lr, weight_decay, decoupled_weight_decay)
    _store(exp_avg, beta1 * exp_avg + (1.0 - beta1) * g)
    _store(exp_avg_sq, beta2 * exp_avg_sq + (1.0 - beta2) * (g * g))
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    step_size = lr / bias_correction1
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * (beta2 ** step) / bias_correction2
    if rho_t > 5.0:  # variance rectification; the adaptive step lr * sqrt(bc2) / (sqrt(v) + eps) * rect
        rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) ** 0.5
        _store(p, p - (step_size * bias_correction2 ** 0.5 * rect) * (exp_avg / (np.sqrt(exp_avg_sq) + eps)))
    else:
        _store(p, p - step_size * exp_avg)


def adabelief_step(p, g, exp_avg, exp_avg_var, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-16,
                   weight_decay=0.0, decoupled_weight_decay=True, maximize=False, grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    g = _weight_decay(p, g, lr, weight_decay, decoupled_weight_decay)
    _store(exp_avg, beta1 * exp_avg + (1.0 - beta1) * g)
    residual = g - exp_avg
    _store(exp_avg_var, beta2 * exp_avg_var + (1.0 - beta2) * (residual * residual))
    _store(exp_avg_var, exp_avg_var + eps)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    denom = np.sqrt(exp_avg_var) * (1.0 / bias_correction2 ** 0.5) + eps
    _store(p, p - (lr / bias_correction1) * (exp_avg / denom))


def lamb_step(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
              bias_correction=True, maximize=False, grad_scale=None, stored=None):
    """stored: how the states read back after they are stored (None: exactly): the kernels' second pass
    reads the stored states, so with 16-bit state (fastopt.precision) the step direction comes from the
    rounded moments while the trust ratio's norm comes from the first pass's exact ones.
    The two phases (lamb_phase1, lamb_phase2) are what a caller holding pieces of a tensor runs, adding the
    pieces' sums in between (fastopt.distributed)."""
    hp = dict(step=step, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              bias_correction=bias_correction)
    param_sumsq, update_sumsq = lamb_phase1(p, g, exp_avg, exp_avg_sq, maximize=maximize, grad_scale=grad_scale, **hp)
    lamb_phase2(p, exp_avg, exp_avg_sq, scaled_lr=lr * lamb_trust_ratio(param_sumsq, update_sumsq), stored=stored,
                **hp)


def _lamb_direction(p, m, v, step, beta1, beta2, eps, weight_decay, bias_correction):
    """u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p."""
    bc1, bc2 = (1.0 - beta1 ** step, 1.0 - beta2 ** step) if bias_correction else (1.0, 1.0)
    return (m * (1.0 / bc1)) / (np.sqrt(v * (1.0 / bc2)) + eps) + weight_decay * p


def lamb_phase1(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                bias_correction=True, maximize=False, grad_scale=None):
    """LAMB's first pass: the moments written; returns (sum p^2, sum u^2) as Python floats, u the update
    direction from the moments just computed (before any 16-bit state is stored). `lr` is not read."""
    g = scaled_grad(g, grad_scale, maximize)
    _store(exp_avg, beta1 * exp_avg + (1.0 - beta1) * g)
    _store(exp_avg_sq, beta2 * exp_avg_sq + (1.0 - beta2) * (g * g))
    update = _lamb_direction(p, exp_avg, exp_avg_sq, step, beta1, beta2, eps, weight_decay, bias_correction)
    return sumsq(p), sumsq(update)


def lamb_trust_ratio(param_sumsq, update_sumsq) -> float:
    """||p|| / ||u|| from the two sums of squares (float64), 1 when either norm is 0 (lamb.cuh's
    lamb_trust_ratio<double> of the square roots)."""
    param_norm = math.sqrt(param_sumsq)
    update_norm = math.sqrt(update_sumsq)
    return param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0


def lamb_phase2(p, exp_avg, exp_avg_sq, *, scaled_lr, step, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                bias_correction=True, stored=None, **ignored):
    """LAMB's second pass: p -= scaled_lr * u (scaled_lr = lr * the whole tensor's trust ratio, rounded to
    p's dtype), u from p and the moments as stored (`stored`: see lamb_step). grads are not read."""
    if stored is not None:
        exp_avg, exp_avg_sq = stored(exp_avg), stored(exp_avg_sq)
    update = _lamb_direction(p, exp_avg, exp_avg_sq, step, beta1, beta2, eps, weight_decay, bias_correction)
    _store(p, p - p.dtype.type(scaled_lr) * update)


def lion_step(p, g, exp_avg, *, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
              grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    _store(p, p * (1.0 - lr * weight_decay))
    c = beta1 * exp_avg + (1.0 - beta1) * g
    _store(p, p - lr * np.sign(c))
    _store(exp_avg, beta2 * exp_avg + (1.0 - beta2) * g)


def adamax_step(p, g, exp_avg, exp_inf, *, step, lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                maximize=False, grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    if weight_decay != 0.0:
        g = g + weight_decay * p
    _store(exp_avg, beta1 * exp_avg + (1.0 - beta1) * g)
    _store(exp_inf, np.maximum(beta2 * exp_inf, np.abs(g) + eps))  # np.maximum propagates NaN
    step_size = lr / (1.0 - beta1 ** step)
    _store(p, p - step_size * (exp_avg / exp_inf))


# ---- issue 14: torch.optim.Adadelta, Rprop, ASGD; Yogi (Zaheer et al. 2018, as pytorch_optimizer.Yogi) ----

def adadelta_step(p, g, square_avg, acc_delta, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False,
                  grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    if weight_decay != 0:
        g = g + weight_decay * p
    _store(square_avg, rho * square_avg + ((1.0 - rho) * g) * g)  # torch's addcmul order
    std = np.sqrt(square_avg + eps)
    delta = np.sqrt(acc_delta + eps) / std * g
    _store(acc_delta, rho * acc_delta + ((1.0 - rho) * delta) * delta)
    _store(p, p - lr * delta)


def rprop_step(p, g, prev, step_size, *, lr=1e-2, etaminus=0.5, etaplus=1.2, step_size_min=1e-6,
               step_size_max=50.0, maximize=False, grad_scale=None):
    # lr is where step_size starts (initial_state); a step does not read it
    g = scaled_grad(g, grad_scale, maximize)
    x = g * prev
    one = np.ones_like(x)
    # torch.sign(NaN) is 0: a NaN x (a NaN gradient, inf times a zero prev) keeps the step size, a NaN g keeps p
    factor = np.where(x > 0, etaplus * one, np.where(x < 0, etaminus * one, one))
    s = step_size * factor
    s = np.where(s < step_size_min, step_size_min * one, s)  # torch.clamp: max first, then min; NaN stays
    s = np.where(s > step_size_max, step_size_max * one, s)
    _store(step_size, s)
    g = np.where(x < 0, 0 * one, g)
    _store(p, p - np.where(np.isnan(g), 0 * one, np.sign(g)) * s)
    _store(prev, g)


def asgd_step(p, g, ax, *, step, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, maximize=False,
              grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    if weight_decay != 0:
        g = g + weight_decay * p
    # torch's eta and mu, stored after step t - 1 (eta = lr and mu = 1 before the first step)
    try:
        eta = lr / ((1.0 + lambd * lr * (step - 1)) ** alpha)
    except OverflowError:
        eta = 0.0
    mu = 1.0 if step == 1 else 1.0 / max(1.0, (step - 1) - t0)
    _store(p, p * (1.0 - lambd * eta))
    _store(p, p - eta * g)
    if p.dtype.type(mu) != 1.0:  # torch copies p when its stored mu is 1 (compared in the data's type)
        _store(ax, ax + (p - ax) * mu)
    else:
        _store(ax, p)


def yogi_step(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-2, beta1=0.9, beta2=0.999, initial_accumulator=1e-6,
              weight_decay=0.0, decoupled_weight_decay=True, fixed_decay=False, eps=1e-3, maximize=False,
              grad_scale=None):
    # initial_accumulator is where both moments start (initial_state); a step does not read it
    g = scaled_grad(g, grad_scale, maximize)
    if decoupled_weight_decay:
        _store(p, p * (1.0 - weight_decay * (1.0 if fixed_decay else lr)))
    elif weight_decay != 0:
        g = g + weight_decay * p
    _store(exp_avg, beta1 * exp_avg + (1.0 - beta1) * g)
    g2 = g * g
    _store(exp_avg_sq, exp_avg_sq - (1.0 - beta2) * (np.sign(exp_avg_sq - g2) * g2))
    denom = np.sqrt(exp_avg_sq) * (1.0 / (1.0 - beta2 ** step) ** 0.5) + eps
    _store(p, p - (lr / (1.0 - beta1 ** step)) * (exp_avg / denom))


def lars_trust_ratio(param_norm, grad_norm, *, weight_decay, trust_coefficient, eps) -> float:
    """LARS's local learning rate (You et al. 2017, eq. 6; pytorch_optimizer.LARS), float64:
    trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps), 1 when ||p|| or the denominator
    without eps is 0."""
    denom = grad_norm + weight_decay * param_norm
    if param_norm > 0.0 and denom > 0.0:
        return trust_coefficient * param_norm / (denom + eps)
    return 1.0


def lars_step(p, g, momentum_buffer=None, *, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0,
              trust_coefficient=1e-3, eps=0.0, nesterov=False, exclude_1d=True, maximize=False, grad_scale=None):
    """LARS as pytorch_optimizer.LARS (4.x) computes it: with exclude_1d, params of ndim <= 1 (biases, norm
    weights, scalars) take plain SGD with momentum (no weight decay, no trust ratio). The momentum
    buffer starts at zero (step 1: buf = (1 - dampening) * g, unlike torch.optim.SGD's buf = g)."""
    g = scaled_grad(g, grad_scale, maximize)
    if not (exclude_1d and p.ndim <= 1):
        trust = lars_trust_ratio(math.sqrt(sumsq(p)), math.sqrt(sumsq(g)), weight_decay=weight_decay,
                                 trust_coefficient=trust_coefficient, eps=eps)
        if weight_decay != 0:  # fo_add_scaled: 0 * inf adds no NaN (pytorch_optimizer adds 0 * p)
            g = g + weight_decay * p
        g = g * trust
    if momentum > 0.0:
        _store(momentum_buffer, momentum * momentum_buffer + (1.0 - dampening) * g)
        g = g + momentum * momentum_buffer if nesterov else momentum_buffer
    _store(p, p - lr * g)



def weight_average_step(averages, params, *, mode, weight, divisor, lr=0.0, grad_scale=None):
    """fastopt.ema_update / swa_update (specs.WEIGHT_AVERAGE: not an optimizer; `averages` is written,
    `params` read). mode 0: torch's lerp by weight; 1: running mean; 2: copy."""
    if mode == 2:
        _store(averages, params)
    elif mode == 1:
        _store(averages, averages + (params - averages) / divisor)
    else:
        w = averages.dtype.type(weight)  # torch narrows the weight, then computes 1 - w in the data's type
        if -0.5 < w < 0.5:  # torch's |w| < 0.5 (schedule-free's eval() lerps by a negative weight)
            _store(averages, averages + w * (params - averages))
        else:
            _store(averages, params - (params - averages) * (averages.dtype.type(1) - w))

# ---- schedule-free SGD / AdamW (Defazio et al. 2024, the schedulefree package) ------------------------------

def _schedule_free_scalars(step, lr, warmup_steps, r, weight_lr_power):
    """(ckp1, lr_t) of step `step` for a constant lr, the package's loop run from step 1 with lr = 1 (lr^power
    cancels in weight / weight_sum; every weight is 0 when lr is 0, and the package's 0 / 0 is 0)."""
    sched = step / warmup_steps if step - 1 < warmup_steps else 1.0
    weight = (step ** r) * (sched ** weight_lr_power)
    if step <= _MU_LOOP_STEPS:
        weight_sum = 0.0
        for t in range(1, step + 1):
            weight_sum = weight_sum + (t ** r) * ((t / warmup_steps if t - 1 < warmup_steps else 1.0) ** weight_lr_power)
    else:  # a loop of 2**40 steps would hang: the registry's closed-form continuation (tested against the loop)
        from fastopt.specs import schedule_free_weight_sum
        weight_sum = schedule_free_weight_sum(warmup_steps, r, weight_lr_power, step)
    if lr == 0.0 and weight_lr_power != 0.0:
        return 0.0, 0.0
    return (weight / weight_sum if weight_sum != 0.0 else 0.0), lr * sched


def _lerp(start, end, w):
    """torch.lerp with a Python weight, in the arrays' dtype."""
    w = start.dtype.type(w)
    if -0.5 < w < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (start.dtype.type(1) - w)


def _schedule_free_update(p, g, z, ckp1, coef, lr_t, weight_decay):
    if weight_decay != 0:
        g = g + weight_decay * p
    y = _lerp(p, z, ckp1)
    _store(p, y + coef * g)
    _store(z, z - lr_t * g)


def schedule_free_sgd_step(p, g, z, *, step, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                           weight_lr_power=2.0, maximize=False, grad_scale=None):
    # z starts as a copy of the param (initial_state)
    g = scaled_grad(g, grad_scale, maximize)
    ckp1, lr_t = _schedule_free_scalars(step, lr, warmup_steps, r, weight_lr_power)
    _schedule_free_update(p, g, z, ckp1, lr_t * (momentum * (1.0 - ckp1) - 1.0), lr_t, weight_decay)


def schedule_free_adamw_step(p, g, z, exp_avg_sq, *, step, lr=0.0025, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0, maximize=False,
                             grad_scale=None):
    g = scaled_grad(g, grad_scale, maximize)
    ckp1, lr_t = _schedule_free_scalars(step, lr, warmup_steps, r, weight_lr_power)
    _store(exp_avg_sq, beta2 * exp_avg_sq + (1.0 - beta2) * (g * g))
    g = g / (np.sqrt(exp_avg_sq / (1.0 - beta2 ** step)) + eps)
    _schedule_free_update(p, g, z, ckp1, lr_t * (beta1 * (1.0 - ckp1) - 1.0), lr_t, weight_decay)


def schedule_free_switch(p, z, weight):
    """eval() / train() of the schedule-free optimizers: p = lerp(p, z, weight), in place."""
    _store(p, _lerp(p, z, weight))


def adan_step(p, g, exp_avg, exp_avg_diff, exp_avg_sq, previous_grad, *, step, lr=1e-3, beta1=0.98, beta2=0.92,
              beta3=0.99, weight_decay=0.0, weight_decouple=False, eps=1e-8, maximize=False, grad_scale=None):
    """Adan (Xie et al. 2022) as pytorch_optimizer.Adan: previous_grad holds -g of the last step; the first
    step's difference is 0."""
    g = scaled_grad(g, grad_scale, maximize)
    diff = previous_grad + g * (0.0 if step == 1 else 1.0)
    _store(exp_avg, beta1 * exp_avg + (1.0 - beta1) * g)
    _store(exp_avg_diff, beta2 * exp_avg_diff + (1.0 - beta2) * diff)
    u = diff * beta2 + g
    _store(exp_avg_sq, beta3 * exp_avg_sq + (1.0 - beta3) * (u * u))
    denom = np.sqrt(exp_avg_sq) / math.sqrt(1.0 - beta3 ** step) + eps
    if weight_decouple and weight_decay != 0:
        _store(p, p * (1.0 - lr * weight_decay))
    _store(p, p - (lr / (1.0 - beta1 ** step)) * (exp_avg / denom))
    _store(p, p - (lr * beta2 / (1.0 - beta2 ** step)) * (exp_avg_diff / denom))
    if not weight_decouple and weight_decay != 0:
        _store(p, p / (1.0 + lr * weight_decay))
    _store(previous_grad, -g)


# registry name (and specs.KERNEL_OPS name) -> reference function: every `<name>_step` defined above (no list
# to keep in sync)
STEPS = {name[:-len("_step")]: fn for name, fn in list(globals().items())
         if name.endswith("_step") and callable(fn) and not name.startswith("_")}


# two-phase optimizers (spec.two_phase) -> (phase 1, phase 2): the passes a caller holding pieces of tensors
# runs apart (fastopt.distributed adds the pieces' sums of squares between them)
TWO_PHASE = {"lamb": (lamb_phase1, lamb_phase2)}

def initial_state(name, state, **hp) -> float:
    """The value state `state` of optimizer `name` starts with (torch.optim's: Adagrad's sum is
    initial_accumulator_value, everything else zero). Written here, apart from the registry's
    spec.state_init, so that the tests compare the two."""
    if name == "adagrad" and state == "state_sum":
        return float(hp.get("initial_accumulator_value", 0.0))
    if name == "rprop" and state == "step_size":  # torch.optim.Rprop: the group's lr
        return float(hp.get("lr", 1e-2))
    if name == "yogi":  # pytorch_optimizer.Yogi: both moments
        return float(hp.get("initial_accumulator", 1e-6))
    if name.startswith("schedule_free_") and state == "z":  # the schedulefree package: a clone of the param
        return "param"
    return 0.0


# ---- clipping ----

def sumsq(x) -> float:
    """Sum of squares in float64."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(np.dot(x, x))


def global_norm(grads) -> float:
    return math.sqrt(sum(sumsq(g) for g in grads))


def clip_coefficient(total_norm, max_norm) -> float:
    """min(1, max_norm / (total_norm + 1e-6)); NaN stays NaN (torch.clamp semantics)."""
    coef = max_norm / (total_norm + 1e-6)
    return 1.0 if coef >= 1.0 else coef


def scale_(g, coef):
    _store(g, g * g.dtype.type(coef))


def clamp_(g, clip_value):
    np.clip(g, -clip_value, clip_value, out=g)


def clip_by_global_norm(grads, max_norm) -> float:
    total = global_norm(grads)
    coef = clip_coefficient(total, max_norm)
    if coef != 1.0:
        for g in grads:
            scale_(g, coef)
    return total
