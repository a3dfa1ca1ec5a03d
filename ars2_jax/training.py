"""Using ARS2-Neo's ``grad_fn`` from the Flax training idioms.

* ``flax.nnx.Optimizer.update(model, grads, grad_fn=...)`` forwards ``grad_fn`` to
  the optimizer, which calls it with the pure parameter arrays; :func:`nnx_grad_fn`
  builds that function from a model and a loss.
* ``flax.training.train_state.TrainState.apply_gradients`` forwards nothing;
  :class:`TrainState` is the same class with ``apply_gradients(grads=...,
  grad_fn=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from flax.training import train_state

__all__ = ["TrainState", "nnx_grad_fn"]


def nnx_grad_fn(
    model: nnx.Module,
    loss_fn: Callable[..., jax.Array],
    *args: Any,
    wrt: Any = nnx.Param,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """``grad_fn`` for ``nnx.Optimizer.update``: gradients of ``loss_fn(model, *args, **kwargs)``.

    ``nnx.Optimizer`` hands the optimizer the pure arrays of ``nnx.state(model,
    wrt)``; the returned function merges such arrays back into a copy of the
    model (the other variables as they are now), and differentiates the loss.

    Args:
      model: the model being trained.
      loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (the same function
        whose ``nnx.grad`` gave the base gradients).
      *args: the batch, passed on to ``loss_fn``.
      wrt: the filter the optimizer was built with.
      **kwargs: passed on to ``loss_fn``.

    Returns:
      ``grad_fn(params) -> grads``, with ``grads`` shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import ars2_jax
      >>> from ars2_jax.training import nnx_grad_fn
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, ars2_jax.ars2_neo(1e-2, rho=0.05, k=1), wrt=nnx.Param)
      >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
      >>> x = jnp.ones((4, 3))
      >>> grads = nnx.grad(loss_fn)(model, x)
      >>> _ = optimizer.update(model, grads, grad_fn=nnx_grad_fn(model, loss_fn, x))
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)

    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params, rest), *args, **kwargs)

    return jax.grad(loss_of)


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards ``grad_fn``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ars2_jax
      >>> from ars2_jax.training import TrainState
      >>> params = {"w": jnp.ones((3, 2))}
      >>> loss = lambda p: jnp.sum((jnp.ones((4, 3)) @ p["w"]) ** 2)
      >>> state = TrainState.create(apply_fn=None, params=params,
      ...                           tx=ars2_jax.ars2_neo(1e-2, rho=0.05, k=1))
      >>> state = state.apply_gradients(grads=jax.grad(loss)(state.params), grad_fn=jax.grad(loss))
      >>> int(state.step)
      1
    """

    def apply_gradients(self, *, grads: Any, grad_fn: Callable | None = None, **kwargs: Any):
        """One optimizer step; ``grad_fn(params) -> grads`` on the same batch (SAM on)."""
        extra = {} if grad_fn is None else {"grad_fn": grad_fn}
        updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=new_opt_state,
            **kwargs,
        )
