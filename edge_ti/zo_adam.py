"""Forward-only gradient descent in z: antithetic Gaussian-smoothing gradient estimates fed to Adam.

    opt = ZerothOrderAdam(dim=64, radius=0.1, lr=0.05, popsize=20, seed=0)
    zs = opt.ask()            # popsize/2 random directions u_i, each as z + c u_i and z - c u_i
    opt.tell(zs, losses)      # g = mean_i (L(z + c u_i) - L(z - c u_i)) / (2c) u_i, then one Adam step

Both candidates of a pair are scored on the same triples (the generation's common random
numbers), so their difference cancels the sampling noise they share: what is left estimates the
directional derivative of the loss, which ranks of single losses (CMA-ES) do not isolate
(benchmarks/results/signal.md). The estimate is the gradient of the Gaussian-smoothed loss
E_u[L(z + c u)] (Nesterov & Spokoiny 2017, the two-point estimate); averaging it over steps with
Adam's moments (Kingma & Ba 2015, Algorithm 1) is the recipe of MeZO (Malladi et al. 2023) with
Adam in place of SGD: its per-coordinate scale keeps steps small where the estimates disagree.

The optimizer has the small part of `cma.CMAEvolutionStrategy`'s interface that edge_ti.search
uses (ask, tell, sigma, result.xfavorite, stop), and like it is a pure function of its seed and
the losses it is told, so a checkpoint replays it by telling the recorded losses again.
"""
from types import SimpleNamespace

import numpy as np


class ZerothOrderAdam:
    def __init__(self, dim, radius, lr, popsize, seed, betas=(0.9, 0.999), eps=1e-8):
        if popsize < 2 or popsize % 2:
            raise ValueError(f"popsize {popsize}: an even number of candidates, two per direction")
        self.dim, self.radius, self.lr, self.popsize = dim, float(radius), float(lr), popsize
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.randn = np.random.RandomState(seed + 1).randn     # its own stream, never numpy's global one
        self.z = np.zeros(dim)                                  # the current point (z = 0: the init)
        self.m = np.zeros(dim)                                  # Adam's first moment of the estimates
        self.v = np.zeros(dim)                                  # ... and second moment
        self.steps = 0
        self._directions = None

    @property
    def sigma(self):
        return self.radius

    @property
    def result(self):
        return SimpleNamespace(xfavorite=self.z.copy())

    def ask(self):
        """[z + c u_1, z - c u_1, z + c u_2, ...]: popsize points, u_i ~ N(0, I)."""
        u = self.randn(self.popsize // 2, self.dim)                          # (P/2, dim)
        self._directions = u
        pairs = np.stack([self.z + self.radius * u, self.z - self.radius * u], axis=1)  # (P/2, 2, dim)
        return list(pairs.reshape(self.popsize, self.dim))

    def tell(self, zs, losses):
        if self._directions is None:
            raise RuntimeError("tell() without ask()")
        u, self._directions = self._directions, None
        losses = np.asarray(losses, np.float64).reshape(-1, 2)             # (P/2, 2): L+, L-
        slopes = (losses[:, 0] - losses[:, 1]) / (2 * self.radius)         # directional derivatives
        g = slopes @ u / len(u)                                             # (dim,) the smoothed gradient
        self.steps += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        self.v = self.beta2 * self.v + (1 - self.beta2) * g * g
        m_hat = self.m / (1 - self.beta1 ** self.steps)
        v_hat = self.v / (1 - self.beta2 ** self.steps)
        self.z = self.z - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def stop(self):
        return {}
