"""Optimizers, gradient clipping and learning-rate schedules.

An optimizer holds the model's parameter and gradient dicts (the live arrays, by name) and updates
the parameters in place. Each update follows the formula of the PyTorch optimizer of the same name,
so the two can be compared step by step. Their state (moment estimates, step count) goes into a
checkpoint through `state_dict()` and comes back through `load_state_dict()`.
"""

import math

import numpy as np


class Optimizer:
    """Base: params and grads are dicts name -> array with the same keys."""

    def __init__(self, params, grads, lr, weight_decay=0.0):
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"learning rate must be a positive number, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay!r}")
        self.params, self.grads = params, grads
        self.lr, self.weight_decay = lr, weight_decay
        self.steps = 0
        self.slots = {}  # per-parameter state arrays, by "slot.param_name"

    def slot(self, kind, name):
        key = f"{kind}.{name}"
        if key not in self.slots:
            self.slots[key] = np.zeros_like(self.params[name])
        return self.slots[key]

    def step(self):
        self.steps += 1
        for name, p in self.params.items():
            self.update(name, p, self.grads[name])

    def decayed(self, p, g):
        """The gradient with L2 weight decay added, as PyTorch's weight_decay does (not AdamW's)."""
        return g + self.weight_decay * p if self.weight_decay else g

    def state_dict(self):
        """(arrays, scalars): the slot arrays by name, and a JSON-able dict of the rest."""
        return dict(self.slots), {"steps": self.steps, "lr": self.lr}

    def load_state_dict(self, arrays, scalars):
        expected = {k for k in arrays}
        unknown = [k for k in expected if k.split(".", 1)[-1] not in self.params]
        if unknown:
            raise ValueError(f"optimizer state names unknown parameters: {unknown[:5]}")
        self.slots = {k: np.array(v, dtype=self.params[k.split(".", 1)[1]].dtype) for k, v in arrays.items()}
        self.steps, self.lr = int(scalars["steps"]), float(scalars["lr"])


class SGD(Optimizer):
    """p -= lr * g, or with momentum: b = momentum * b + g; p -= lr * b."""

    def __init__(self, params, grads, lr=1e-3, momentum=0.0, weight_decay=0.0):
        super().__init__(params, grads, lr, weight_decay)
        self.momentum = momentum

    def update(self, name, p, g):
        g = self.decayed(p, g)
        if self.momentum:
            b = self.slot("momentum", name)
            if self.steps == 1:
                b[...] = g
            else:
                b *= self.momentum
                b += g
            g = b
        p -= self.lr * g


class Adagrad(Optimizer):
    """s += g^2; p -= lr * g / (sqrt(s) + eps)."""

    def __init__(self, params, grads, lr=1e-2, eps=1e-10, weight_decay=0.0):
        super().__init__(params, grads, lr, weight_decay)
        self.eps = eps

    def update(self, name, p, g):
        g = self.decayed(p, g)
        s = self.slot("sum", name)
        s += g * g
        p -= self.lr * g / (np.sqrt(s) + self.eps)


class RMSprop(Optimizer):
    """s = alpha * s + (1 - alpha) * g^2; p -= lr * g / (sqrt(s) + eps)."""

    def __init__(self, params, grads, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0):
        super().__init__(params, grads, lr, weight_decay)
        self.alpha, self.eps = alpha, eps

    def update(self, name, p, g):
        g = self.decayed(p, g)
        s = self.slot("square_avg", name)
        s *= self.alpha
        s += (1 - self.alpha) * g * g
        p -= self.lr * g / (np.sqrt(s) + self.eps)


class Adam(Optimizer):
    """Adam with bias correction; the second moment is of the squared gradient.

        m = b1 m + (1 - b1) g          m_hat = m / (1 - b1^t)
        v = b2 v + (1 - b2) g^2        v_hat = v / (1 - b2^t)
        p -= lr * m_hat / (sqrt(v_hat) + eps)

    weight_decay adds L2 to the gradient as torch.optim.Adam does; AdamW decouples it.
    """

    decoupled = False

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, grads, lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps

    def update(self, name, p, g):
        if self.decoupled:
            p *= 1 - self.lr * self.weight_decay
        else:
            g = self.decayed(p, g)
        m, v = self.slot("exp_avg", name), self.slot("exp_avg_sq", name)
        # the same arrangement of the bias corrections as PyTorch, so the two agree to rounding
        step_size = self.lr / (1 - self.beta1**self.steps)
        correction2 = math.sqrt(1 - self.beta2**self.steps)
        compiled = _compiled_adam(p, g, m, v)
        if compiled is not None:  # the lines below in one pass, in the same order and dtype
            t = p.dtype.type
            compiled(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), t(self.beta1),
                     t(1 - self.beta1), t(self.beta2), t(1 - self.beta2), t(step_size), t(correction2),
                     t(self.eps))
            return
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * (g * g)
        denom = np.sqrt(v) / correction2
        denom += self.eps
        p -= step_size * (m / denom)


def _compiled_adam(p, g, m, v):
    """fused.adam_update where numba is in use and the four arrays are C-contiguous float32 or
    float64 of one dtype (views of them flat); else None. One pass instead of nine with temporaries:
    at configuration c (3.3 million parameters) 9.8 ms of a step."""
    from nanolstm import functional

    kernel = functional._compiled.get("adam")
    arrays = (p, g, m, v)
    if kernel is None or p.dtype not in (np.float32, np.float64):
        return None
    if any(a.dtype != p.dtype or not a.flags.c_contiguous for a in arrays):
        return None
    return kernel


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step."""

    decoupled = True

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, grads, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW}


# ---------------------------------------------------------------------------------------------
# Clipping: the result is written back into the gradients (the tutorials threw it away).


def global_norm(grads):
    """sqrt of the sum of squares of every gradient entry: each gradient's sum by the BLAS in the
    gradient's dtype, their total in float64."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients together so that their global norm is at most max_norm, in place.
    Returns the norm before clipping (inf or NaN if a gradient is not finite; then nothing changes).
    As torch.nn.utils.clip_grad_norm_: the scale is max_norm / (norm + 1e-6) wherever that is below 1,
    so a norm just under max_norm is scaled too, by less than 1e-6 / max_norm."""
    norm = global_norm(grads)
    scale = max_norm / (norm + 1e-6)
    if math.isfinite(norm) and scale < 1:
        for g in grads.values():
            g *= g.dtype.type(scale)
    return norm


def clip_grad_value(grads, value):
    """Clamp every gradient entry to [-value, value], in place."""
    for g in grads.values():
        np.clip(g, -value, value, out=g)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: a pure function of the step, so a resumed run needs no extra state.


def lr_at(step, base_lr, schedule="constant", max_steps=1, warmup=0, step_size=1000, gamma=0.5,
          min_lr=0.0):
    """The learning rate for update number `step` (0-based).

    warmup: linear from base_lr/warmup up to base_lr over the first `warmup` updates. Then
    constant; step: times gamma every step_size updates; cosine: from base_lr down to min_lr at
    max_steps.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** ((step - warmup) // step_size)
    if schedule == "cosine":
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: use constant, step or cosine")
