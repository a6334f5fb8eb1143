"""Build an LSTM, run it forward and backward, and check its gradients against numerical ones.

    python examples/layers.py
"""

import numpy as np

import nanolstm as nl

rng = np.random.default_rng(0)
T, N, D, H = 5, 3, 4, 6

# float64, so that central differences are precise enough to compare with
lstm = nl.LSTM(D, H, num_layers=2, dtype=np.float64, rng=rng)
x = rng.standard_normal((T, N, D))
dout = rng.standard_normal((T, N, H))  # the "fake loss" sum(out * dout) has dout as its gradient


def loss():
    out, _ = lstm.forward(x)
    return np.sum(out * dout)


out, (h_n, c_n) = lstm.forward(x)
print(f"out {out.shape}, h_n {h_n.shape}, c_n {c_n.shape}")
lstm.zero_grad()
dx, (dh0, dc0) = lstm.backward(dout)

errors = nl.check_gradients(loss, {"x": x, **lstm.params}, {"x": dx, **lstm.grads})
for name, err in errors.items():
    print(f"{name:14s} relative error {err:.1e}")
worst = max(errors.values())
print(f"worst relative error {worst:.1e}: {'ok' if worst < 1e-6 else 'WRONG'}")
raise SystemExit(0 if worst < 1e-6 else 1)
