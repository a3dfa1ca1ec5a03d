"""SAM on torch models with state: sam_closure keeps BatchNorm's statistics and dropout's masks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ars2_torch import ARS2Neo, SAMClosure, ars2_param_groups, sam_closure


@pytest.fixture(autouse=True)
def _keep_the_global_random_state():
    # These tests seed torch; the tests that run after them draw unseeded data.
    with torch.random.fork_rng():
        yield


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2)
    )


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Dropout(0.2),  # before the ReLU: a zero after it is a dropped unit
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 2),
    )


MODELS = {"mlp": (_mlp, (24, 6)), "cnn": (_cnn, (12, 3, 4, 4))}


def _data(shape):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=generator)
    return x, torch.randint(0, 2, (shape[0],), generator=generator)


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _state(model):
    return {name: b.clone() for name, b in model.named_buffers()}, torch.get_rng_state()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sam", [{"rho": 0.05, "k": 1}, {"rho": 0.05, "k": 2}])
def test_model_state_after_each_step_is_that_of_a_step_without_sam(name, sam):
    make, shape = MODELS[name]
    model = make()
    x, y = _data(shape)
    opt = ARS2Neo(ars2_param_groups(model), lr=1e-2, **sam)
    torch.manual_seed(5)
    for _ in range(3):
        # What the model's state would be after this step without SAM: one
        # forward and backward pass from the current parameters.
        rng = torch.get_rng_state()
        without_sam = copy.deepcopy(model)
        _closure(without_sam, x, y)()
        expected_buffers, expected_rng = _state(without_sam)
        torch.set_rng_state(rng)

        opt.zero_grad()
        opt.step(sam_closure(model, _closure(model, x, y)))
        buffers, rng_after = _state(model)
        assert buffers.keys() == expected_buffers.keys()
        for key, value in expected_buffers.items():
            assert torch.equal(buffers[key], value), key
        assert torch.equal(rng_after, expected_rng)
    assert int(model[1].num_batches_tracked) == 3
    assert opt.diagnostics["sync_count"] == (3 if sam["k"] == 1 else 2)


def test_a_plain_closure_counts_the_adversarial_pass_too():
    model = _mlp()
    x, y = _data((24, 6))
    opt = ARS2Neo(ars2_param_groups(model), lr=1e-2, rho=0.05, k=1)
    opt.step(_closure(model, x, y))
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("name", MODELS)
def test_both_passes_of_a_sync_step_draw_the_same_dropout_mask(name):
    make, shape = MODELS[name]
    model = make()
    x, y = _data(shape)
    masks = []
    dropout = next(m for m in model if isinstance(m, nn.Dropout))
    dropout.register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
    opt = ARS2Neo(ars2_param_groups(model), lr=1e-2, rho=0.05, k=1)
    for _ in range(2):
        opt.zero_grad()
        opt.step(sam_closure(model, _closure(model, x, y)))
    assert len(masks) == 4
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[3])
    assert not torch.equal(masks[0], masks[2])  # each step draws its own mask


def test_the_adversarial_gradient_is_that_of_the_base_pass_objective():
    # With the same dropout mask, the adversarial pass at θ + e equals a pass on
    # a copy whose parameters are θ + e, run from the random state of the base pass.
    model = _mlp()
    x, y = _data((24, 6))
    opt = ARS2Neo(ars2_param_groups(model), lr=1e-2, rho=0.05, k=1)
    closure = _closure(model, x, y)
    passes, perturbed = [], {}

    def record_parameters_of_the_second_pass(module, inputs):
        passes.append(True)
        if len(passes) == 2:
            perturbed.update({n: p.detach().clone() for n, p in model.named_parameters()})

    model.register_forward_pre_hook(record_parameters_of_the_second_pass)
    rng = torch.get_rng_state()
    twin = copy.deepcopy(model)
    opt.step(sam_closure(model, closure))
    adversarial = {n: p.grad.clone() for n, p in model.named_parameters()}

    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(perturbed[n])
    torch.set_rng_state(rng)
    nn.functional.cross_entropy(twin(x), y).backward()
    for n, p in twin.named_parameters():
        torch.testing.assert_close(adversarial[n], p.grad, rtol=0, atol=0)


def test_adversarial_before_the_base_pass_and_wrong_arguments_raise():
    model = _mlp()
    with pytest.raises(ValueError, match="before the base pass"):
        SAMClosure(model, lambda: None).adversarial()
    with pytest.raises(ValueError, match="model="):
        sam_closure(lambda: None, lambda: None)
    with pytest.raises(ValueError, match="closure="):
        sam_closure(model, None)
