"""SAM closures for models with non-parameter state: batch-norm statistics and dropout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _rng_devices(model: nn.Module) -> list[torch.device]:
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({t.device for t in tensors if t.device.type not in ("cpu", "meta")}, key=str)


def _rng_state(devices: list[torch.device]) -> list[torch.Tensor]:
    """The CPU generator's state, then that of each accelerator device."""
    return [torch.get_rng_state()] + [
        torch.get_device_module(device).get_rng_state(device) for device in devices
    ]


def _set_rng_state(devices: list[torch.device], states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    for device, state in zip(devices, states[1:]):
        torch.get_device_module(device).set_rng_state(state, device)


class SAMClosure:
    """A closure whose adversarial pass leaves the model's state as the base pass left it.

    Made by :func:`sam_closure`; :class:`~ars2_torch.ARS2Neo` calls it once for
    the base pass and :meth:`adversarial` for the second pass of a sync step.

    Args:
      model: the module the closure runs.
      closure: runs forward and backward on one batch and returns the loss.

    Example:
      >>> import torch
      >>> from ars2_torch import SAMClosure
      >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
      >>> x = torch.randn(4, 2)
      >>> closure = SAMClosure(model, lambda: model(x).sum())
      >>> base, adversarial = closure(), closure.adversarial()
      >>> int(model[1].num_batches_tracked)
      1
    """

    def __init__(self, model: nn.Module, closure: Callable[[], Any]):
        self.model = model
        self.closure = closure
        self._rng_before_base: list[torch.Tensor] | None = None
        self._devices: list[torch.device] = []

    def __call__(self) -> Any:
        """The base pass: runs the closure, remembering the random state it started from."""
        self._devices = _rng_devices(self.model)
        self._rng_before_base = _rng_state(self._devices)
        return self.closure()

    def adversarial(self) -> Any:
        """The adversarial pass: the base pass's random draws, its buffers kept.

        Replays the random state the base pass started from (the same dropout
        masks), runs the closure, then puts back every buffer (batch-norm running
        statistics, ``num_batches_tracked``) and the random state as the base pass
        left them.
        """
        if self._rng_before_base is None:
            raise ValueError("SAMClosure.adversarial() called before the base pass")
        with torch.no_grad():
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        rng_after_base = _rng_state(self._devices)
        _set_rng_state(self._devices, self._rng_before_base)
        try:
            return self.closure()
        finally:
            with torch.no_grad():
                for name, value in buffers.items():
                    self.model.get_buffer(name).copy_(value)
            _set_rng_state(self._devices, rng_after_base)


def sam_closure(model: nn.Module, closure: Callable[[], Any]) -> SAMClosure:
    """Wraps a closure so that SAM's second pass changes no model state (one rule with ars2_jax).

    On a sync step :class:`~ars2_torch.ARS2Neo` evaluates the gradient twice on
    the same batch. The rule for the model's non-parameter state: the
    adversarial pass reuses the base pass's random draws (the same dropout
    masks, so that its gradient is that of the same stochastic objective at the
    perturbed parameters), and its changes to buffers are discarded (batch-norm
    running statistics and ``num_batches_tracked`` keep the base pass's values).
    The model's buffers and the random generators after a step are then those of
    a step without SAM. A plain closure instead updates the running statistics
    twice and draws new dropout masks on the second pass.

    Args:
      model: the module the closure runs; its buffers are kept and the random
        generators of the devices it lives on (and the CPU's) are replayed.
      closure: runs forward and backward on one batch and returns the loss.

    Returns:
      A :class:`SAMClosure`: pass it to ``opt.step``; make one per step or reuse
      it, each call starts a new base pass.

    Example:
      >>> import torch
      >>> from ars2_torch import ARS2Neo, ars2_param_groups, sam_closure
      >>> model = torch.nn.Sequential(
      ...     torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1),
      ...     torch.nn.Linear(8, 1))
      >>> opt = ARS2Neo(ars2_param_groups(model), lr=1e-2, rho=0.05, k=1)
      >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
      >>> def closure():
      ...     loss = torch.nn.functional.mse_loss(model(x), y)
      ...     loss.backward()
      ...     return loss
      >>> opt.zero_grad()
      >>> loss = opt.step(sam_closure(model, closure))
      >>> int(model[1].num_batches_tracked)  # one forward pass counted, not two
      1
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={model!r} must be a torch.nn.Module")
    if not callable(closure):
        raise ValueError(f"closure={closure!r} must be callable")
    return SAMClosure(model, closure)
