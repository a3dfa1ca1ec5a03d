"""The Muon baselines: the seed's values, and where optax's Muon differs from the reference.

The JAX Muon runs are ``optax.contrib.muon``; the PyTorch ones the reference Muon itself
(``muon-optimizer==0.1.0``, KellerJordan/Muon's ``SingleDeviceMuonWithAuxAdam``), the
optimizer the seed ran. Each test states one convention where the two differ and bounds
what it does to an update, as the parity tests do for ARS2-Neo.
"""

import jax
import jax.numpy as jnp
import muon
import numpy as np
import optax
import pytest
import torch

from experiments import common, grokking
from models.grokking_torch import from_flax_params

BETA = 0.95


def _config(name):
    return common.load_config(grokking.CONFIG_DIR / f"{name}.toml")


def test_seed_config_is_the_reference_group_defaults():
    # What the seed ran (SPEC §7): the reference Muon's group defaults, since its script
    # passed groups without values. muon.toml writes exactly those out.
    w = torch.nn.Parameter(torch.zeros(4, 4))
    b = torch.nn.Parameter(torch.zeros(4))
    groups = muon.SingleDeviceMuonWithAuxAdam(
        [{"params": [w], "use_muon": True}, {"params": [b], "use_muon": False}]
    ).param_groups
    optimizer = _config("muon")["optimizer"]
    adam = optimizer["adam"]
    assert (optimizer["learning_rate"], optimizer["momentum"], optimizer["weight_decay"]) == (
        groups[0]["lr"],
        groups[0]["momentum"],
        groups[0]["weight_decay"],
    )
    assert (adam["learning_rate"], tuple(adam["betas"]), adam["eps"], adam["weight_decay"]) == (
        groups[1]["lr"],
        groups[1]["betas"],
        groups[1]["eps"],
        groups[1]["weight_decay"],
    )


def test_torch_path_builds_the_reference_muon_with_the_config_values():
    config = _config("muon_wd")
    model = grokking.Transformer(grokking.model_config(config))
    params = grokking.init_params(model, 0)
    net = from_flax_params(model.config, params)
    names = [n for n, d in grokking.muon_dimension_numbers(params).items() if d is not None]
    optimizer = common.torch_optimizer(config["optimizer"], net, muon_names=names)
    assert isinstance(optimizer, muon.SingleDeviceMuonWithAuxAdam)
    on_muon, on_adam = optimizer.param_groups
    assert on_muon["use_muon"] and not on_adam["use_muon"]
    assert (on_muon["lr"], on_muon["momentum"], on_muon["weight_decay"]) == (0.02, 0.9, 1.0)
    assert (on_adam["lr"], on_adam["betas"], on_adam["weight_decay"]) == (1e-3, (0.9, 0.98), 1.0)
    named = dict(net.named_parameters())
    assert {id(p) for p in on_muon["params"]} == {id(named[n]) for n in names}
    assert {"W_E", "W_pos", "W_U", "b_in", "b_out"} == set(named) - set(names)
    with pytest.raises(common.UnsupportedOnTorch, match="muon_names"):
        common.torch_optimizer(config["optimizer"], net)
    with pytest.raises(ValueError, match="not parameters"):
        common.torch_optimizer(config["optimizer"], net, muon_names=["W_nope"])


def _orthogonal_pair(n=4):
    # Two gradients with disjoint supports: each one's share of the momentum stays
    # readable after any normalization.
    g1, g2 = np.zeros((n, n), np.float32), np.zeros((n, n), np.float32)
    g1[0, 0], g2[1, 1] = 1.0, 1.0
    return g1, g2


def test_momentum_bias_correction_differs(monkeypatch):
    # Reference: m <- lerp(m, g, 1 - b), update lerp(g, m, b), no bias correction; after
    # two steps g1 weighs b^2 / (1 + b) of g2. optax bias-corrects both terms of its
    # Nesterov momentum: b^2 (1 - b) / (1 - b^3) against
    # b (1 - b) / (1 - b^3) + (1 - b) / (1 - b^2).
    g1, g2 = _orthogonal_pair()
    # Newton-Schulz off on both sides (normalization only), to read the momentum.
    monkeypatch.setattr(muon, "zeropower_via_newtonschulz5", lambda g, steps: g / g.norm())
    w = torch.nn.Parameter(torch.zeros(4, 4))
    ref = muon.SingleDeviceMuonWithAuxAdam([{"params": [w], "use_muon": True, "lr": 1.0}])
    for g in (g1, g2):
        w.grad = torch.from_numpy(g.copy())
        before = w.detach().clone()
        ref.step()
    ref_update = (before - w.detach()).numpy()
    tx = optax.contrib.muon(1.0, ns_steps=0, beta=BETA, eps=0.0)
    params = jnp.zeros((4, 4))
    state = tx.init(params)
    for g in (g1, g2):
        update, state = tx.update(jnp.asarray(g), state, params)
    ours = -np.asarray(update)
    assert ref_update[0, 0] / ref_update[1, 1] == pytest.approx(BETA**2 / (1 + BETA), rel=1e-5)
    g1_weight = BETA**2 * (1 - BETA) / (1 - BETA**3)
    g2_weight = BETA * (1 - BETA) / (1 - BETA**3) + (1 - BETA) / (1 - BETA**2)
    assert ours[0, 0] / ours[1, 1] == pytest.approx(g1_weight / g2_weight, rel=1e-5)
    assert ours[0, 0] / ours[1, 1] == pytest.approx(0.374, abs=1e-3)  # vs 0.463


def _one_step(config, seed=0):
    """One update of both Muons from the same weights and full-rank random gradients."""
    model = grokking.Transformer(grokking.model_config(config))
    params = grokking.init_params(model, 0)
    dims = grokking.muon_dimension_numbers(params)
    keys = jax.random.split(jax.random.key(seed), len(params))
    grads = {
        name: jax.random.normal(key, p.shape)
        for (name, p), key in zip(sorted(params.items()), keys)
    }
    tx = common.optax_optimizer(config["optimizer"], muon_dimension_numbers=dims)
    update, _ = tx.update(grads, tx.init(params), params)
    net = from_flax_params(model.config, params)
    names = [n for n, d in dims.items() if d is not None]
    ref = common.torch_optimizer(config["optimizer"], net, muon_names=names)
    for name, p in net.named_parameters():
        p.grad = torch.from_numpy(np.asarray(grads[name]).copy())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ref.step()
    ref_update = {n: (p.detach() - before[n]).numpy() for n, p in net.named_parameters()}
    return {n: np.asarray(u) for n, u in update.items()}, ref_update, set(names)


def test_first_step_adam_part_is_nesterov_in_optax():
    # optax passes Muon's nesterov=True on to its Adam part (NAdam): its first step is
    # (1 + b1 / (1 + b1)) times the reference Adam's, which is sign(g) * lr there.
    ours, ref, on_muon = _one_step(_config("muon"))
    b1 = _config("muon")["optimizer"]["adam"]["betas"][0]
    for name in set(ours) - on_muon:
        np.testing.assert_allclose(ours[name], ref[name] * (1 + b1 / (1 + b1)), rtol=1e-4)


def test_first_step_muon_part_differs_by_bfloat16_newton_schulz():
    # The reference iterates in bfloat16 after X / (|X| + 1e-7); optax in float32 after
    # X / (|X| + eps). Same momentum on step 1 (one gradient), so what is left is the
    # dtype: measured 2-4% relative (Frobenius) per matrix; bounded at 10%, and above
    # float32's rounding, so the test would notice either side changing its dtype.
    ours, ref, on_muon = _one_step(_config("muon"))
    for name in on_muon:
        error = np.linalg.norm(ours[name] - ref[name]) / np.linalg.norm(ref[name])
        assert 1e-3 < error < 0.1, (name, error)
