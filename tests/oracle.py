"""A NumPy float64 oracle of ARS2-Neo, written from SPEC.md §2-§6 alone.

It shares no code with either implementation: both are checked against it. It
is deliberately plain (one loop, one dict per tensor) and slow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
TINY = 1e-12


def to_matrices(x: np.ndarray, layout: str) -> np.ndarray:
    """The default matrix view of SPEC §2 as ``(batch, rows, cols)``, per framework layout."""
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3:
        return x
    if layout == "torch":  # (out, ...) -> (out, rest)
        return x.reshape(1, x.shape[0], -1)
    if layout == "flax":  # (..., out) -> (rest, out)
        return x.reshape(1, -1, x.shape[-1])
    raise ValueError(layout)


def newton_schulz(x: np.ndarray, layout: str, steps: int = 5) -> np.ndarray:
    """SPEC §3, iterated in float64, one matrix at a time."""
    a, b, c = NS_COEFFS
    out = []
    for g in to_matrices(x, layout):
        transposed = g.shape[0] > g.shape[1]
        m = g.T if transposed else g
        m = m / (np.linalg.norm(m) + NS_EPS)
        for _ in range(steps):
            gram = m @ m.T
            m = a * m + (b * gram + c * gram @ gram) @ m
        out.append(m.T if transposed else m)
    return np.stack(out).reshape(x.shape)


def newton_schulz_closed_form(x: np.ndarray, steps: int = 5) -> np.ndarray:
    """SPEC §3's closed form for one matrix: ``U f^steps(Σ / (‖G‖ + ns_eps)) Vᵀ`` via an SVD."""
    a, b, c = NS_COEFFS
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    s = s / (np.linalg.norm(x) + NS_EPS)
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return (u * s) @ vt


class Oracle:
    """ARS2-Neo on a dict of float64 arrays.

    Args:
      params: name -> array.
      tracks: name -> ``'ars2'`` or ``'adamw'``.
      hparams: track -> dict(lr, b1, b2, eps, weight_decay).
      sam: dict(rho, k, alpha, adaptive, adaptive_beta, adaptive_lambda, adaptive_gamma).
      layout: ``'torch'`` or ``'flax'``, the matrix views of SPEC §2.
    """

    def __init__(self, params, tracks, hparams, sam, layout="torch", ns_steps=5):
        self.params = {n: np.array(p, dtype=np.float64) for n, p in params.items()}
        self.tracks, self.hparams, self.sam = tracks, hparams, sam
        self.layout, self.ns_steps = layout, ns_steps
        self.m = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.shear = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.t = 0
        self.last_sync = 0
        self.sync_count = 0
        self.var = 0.0

    def step(self, grad_fn: Callable[[dict], dict]) -> dict:
        """One step; returns the diagnostics of SPEC §6 plus ``sync`` and ``decided_by_phi``
        (an adaptive step whose branch the comparison of φ with the threshold chose)."""
        sam = self.sam
        self.t += 1
        t = self.t
        g = grad_fn(self.params)
        keeps_shear = sam["k"] > 1 or sam["adaptive"]
        phi, threshold, alpha_t, sync, by_phi = 0.0, 0.0, sam["alpha"], False, False
        if sam["rho"] > 0 and sam["adaptive"]:
            dot = sum(float(np.sum(g[n] * self.shear[n])) for n in g)
            gg = sum(float(np.sum(g[n] ** 2)) for n in g)
            ss = sum(float(np.sum(self.shear[n] ** 2)) for n in g)
            phi = dot / (np.sqrt(gg * ss) + TINY)
            if t == 1:
                self.var = phi**2
            elif t - self.last_sync > 1:
                beta = sam["adaptive_beta"]
                self.var = beta * self.var + (1 - beta) * phi**2
            threshold = -sam["adaptive_lambda"] * np.sqrt(self.var)
            forced = t == 1 or (sam["k"] > 1 and t - self.last_sync >= sam["k"])
            sync = phi < threshold or forced
            by_phi = not forced
            alpha_t = sam["alpha"] * (1 + max(0.0, phi)) ** sam["adaptive_gamma"]
        elif sam["rho"] > 0:
            sync = sam["k"] == 1 or t % sam["k"] == 1

        if sync:
            self.last_sync = t
            self.sync_count += 1
            perturbed = {}
            for n, p in self.params.items():
                hp = self.hparams[self.tracks[n]]
                v_hat_prev = self.v[n] / (1 - hp["b2"] ** max(1, t - 1) + TINY)
                direction = g[n] / (np.sqrt(v_hat_prev) + hp["eps"]) * np.abs(p)
                perturbed[n] = p + sam["rho"] * direction / (np.linalg.norm(direction) + TINY)
            g_adv = grad_fn(perturbed)
            if keeps_shear:
                for n in g:
                    coef = np.sum(g_adv[n] * g[n]) / (np.sum(g[n] ** 2) + TINY)
                    self.shear[n] = g_adv[n] - coef * g[n]
            g_used = g_adv
        elif sam["rho"] > 0 and keeps_shear:
            g_used = {
                n: g[n]
                + alpha_t
                * np.linalg.norm(g[n])
                / (np.linalg.norm(self.shear[n]) + TINY)
                * self.shear[n]
                for n in g
            }
        else:
            g_used = g

        for n, p in self.params.items():
            hp = self.hparams[self.tracks[n]]
            self.m[n] = hp["b1"] * self.m[n] + (1 - hp["b1"]) * g_used[n]
            self.v[n] = hp["b2"] * self.v[n] + (1 - hp["b2"]) * g_used[n] ** 2
            m_hat = self.m[n] / (1 - hp["b1"] ** t)
            v_hat = self.v[n] / (1 - hp["b2"] ** t)
            u = m_hat / (np.sqrt(v_hat) + hp["eps"])
            if self.tracks[n] == "ars2":
                u = np.linalg.norm(u) * newton_schulz(u, self.layout, self.ns_steps)
            self.params[n] = p * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * u

        return {
            "phi": phi,
            "phi_std": float(np.sqrt(self.var)),
            "threshold": threshold,
            "alpha_t": alpha_t,
            "sync_count": self.sync_count,
            "effective_k": t / max(1, self.sync_count),
            "sync": sync,
            "decided_by_phi": by_phi,
        }
