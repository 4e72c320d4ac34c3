"""Forward-only Gauss-Newton in z: what the UNet's predictions say, not only their losses.

    opt = GaussNewton(dim=64, directions=8, step=0.25, prior=1.0, seed=0)
    zs = opt.ask()            # [z, z + h u_1, ..., z + h u_k]: the point and k probes along random directions
    opt.tell(zs, gram)        # gram [k+1, k+1]: objective.population_gram of those candidates

Every candidate of a generation is scored on the same triples, so the difference of two
candidates' predictions on a triple is what the embedding changed, noise shared and cancelled.
The Gram matrix of their residuals r_a = unet(..., e0 + W z_a) - target holds all of it:

    J = [r_1 - r_0, ..., r_k - r_0] / h           finite-difference Jacobian along u_1..u_k
    A = J^T J = (G[j,l] - G[j,0] - G[0,l] + G[0,0]) / h^2        Gauss-Newton curvature (k x k)
    b = J^T r_0 = (G[j,0] - G[0,0]) / h                          half the gradient of the loss
    L(z + U d) ~ L(z) + 2 b.d + d.A d                            the local quadratic model

A CMA-ES generation of the same samples gives k + 1 numbers (their losses); this gives the
gradient and the curvature along every probe (Gauss-Newton: Nocedal & Wright 2006, sec. 10.3).
One generation's triples are few and noisy, so no single model is trusted: the local models of
all generations are summed, each around the point it was measured at, and the search moves to
the minimum of the sum plus a prior that pulls toward the init (z = 0),

    z_{t+1} = argmin_z  sum_s [2 g_s.(z - z_s) + (z - z_s).H_s (z - z_s)] + lambda |z|^2
            = (sum_s H_s + lambda I)^-1 sum_s (H_s z_s - g_s)

with H_s = U_s A_s U_s^T, g_s = U_s b_s (recursive least squares: on a quadratic loss probed along
every direction, the average of all the evidence, where a gradient step of fixed size keeps the
last steps' noise; probed along a few directions at a time, the sum lacks the cross terms
between generations' probes, and converges more slowly). lambda = prior x the first generation's
mean curvature per probe (edge_ti.train's default prior 30: the init weighs as much as 30 generations
of evidence; weaker priors let the first, noisiest generations throw the token out); directions never
probed stay at the init. Fresh random directions each generation re-aim the probes, so the whole
space is searched, not a fixed subspace.

Measured (benchmarks/results/gauss_newton.md): per UNet sample it lowers the loss about 1.75x
faster than CMA-ES on average, far faster on some concepts and no faster on others. With a weak
prior the first, noisiest models threw the token far out, where the norm cap (edge_ti.subspace)
bends the map from z to the embedding, and it did not come back. Forgetting old models, a bound
on |z| and a trust radius per step were tried and did worse than the stronger prior.

Like zo_adam it has the part of cma's interface that edge_ti.search uses, tells a Gram matrix
(`tells = "gram"`), and is a pure function of its seed and of what it was told, so a checkpoint
replays it by telling the recorded Gram matrices again.
"""
from types import SimpleNamespace

import numpy as np


class GaussNewton:
    tells = "gram"   # edge_ti.search scores its populations with objective.population_gram

    def __init__(self, dim, directions, step, prior, seed):
        if not 1 <= directions <= dim:
            raise ValueError(f"{directions} directions: 1 to dim ({dim})")
        self.dim, self.directions, self.step, self.prior = dim, directions, float(step), prior
        self.normal = np.random.RandomState(seed + 1).standard_normal   # its own stream, never numpy's global one
        self.z = np.zeros(dim)                                           # the current point (z = 0: the init)
        self.curvature = np.zeros((dim, dim))                            # sum_s H_s
        self.pull = np.zeros(dim)                                        # sum_s (H_s z_s - g_s)
        self.ridge = None                                                # lambda, from the first generation
        self._probes = None

    @property
    def popsize(self):
        return self.directions + 1

    @property
    def sigma(self):
        return self.step

    @property
    def result(self):
        return SimpleNamespace(xfavorite=self.z.copy())

    def ask(self):
        """[z, z + h u_1, ..., z + h u_k] with u_1..u_k orthonormal, random."""
        U, _ = np.linalg.qr(self.normal((self.dim, self.directions)))     # (dim, k)
        self._probes = U
        return list(np.vstack([self.z, self.z + self.step * U.T]))

    def tell(self, zs, gram):
        if self._probes is None:
            raise RuntimeError("tell() without ask()")
        U, self._probes = self._probes, None
        G = np.asarray(gram, np.float64)                                   # (k+1, k+1)
        h = self.step
        A = (G[1:, 1:] - G[1:, :1] - G[:1, 1:] + G[0, 0]) / h ** 2        # J^T J  (k, k)
        b = (G[1:, 0] - G[0, 0]) / h                                      # J^T r_0  (k,)
        if self.ridge is None:
            self.ridge = self.prior * max(float(np.trace(A)) / len(A), 1e-30)
        H, g = U @ A @ U.T, U @ b                                          # in z's coordinates
        self.curvature += H
        self.pull += H @ self.z - g
        self.z = np.linalg.solve(self.curvature + self.ridge * np.eye(self.dim), self.pull)

    def stop(self):
        return {}
