"""Using ARS2-Neo's ``grad_fn`` from the Flax training idioms.

* ``flax.nnx.Optimizer.update(model, grads, grad_fn=...)`` forwards ``grad_fn`` to
  the optimizer, which calls it with the pure parameter arrays; :func:`nnx_grad_fn`
  builds that function from a model and a loss.
* :func:`nnx_matrix_views` and :func:`linen_matrix_views` read each kernel's
  matrix view and track from the module that owns it (SPEC §2).
* :func:`accumulated_grad_fn` accumulates gradients over micro-batches inside
  ``grad_fn``, which ``optax.MultiSteps`` cannot do for SAM.
* ``flax.training.train_state.TrainState.apply_gradients`` forwards nothing;
  :class:`TrainState` is the same class with ``apply_gradients(grads=...,
  grad_fn=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

from ars2_jax._model_views import linen_matrix_views, nnx_matrix_views

__all__ = [
    "TrainState",
    "accumulated_grad_fn",
    "linen_matrix_views",
    "nnx_grad_fn",
    "nnx_matrix_views",
]


def nnx_grad_fn(
    model: nnx.Module,
    loss_fn: Callable[..., jax.Array],
    *args: Any,
    wrt: Any = nnx.Param,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """``grad_fn`` for ``nnx.Optimizer.update``: gradients of ``loss_fn(model, *args, **kwargs)``.

    ``nnx.Optimizer`` hands the optimizer the pure arrays of ``nnx.state(model,
    wrt)``. The returned function merges such arrays into a fresh copy of the
    model whose other variables (batch statistics, RNG keys and counts, frozen
    weights outside ``wrt``) hold the values they had when ``nnx_grad_fn`` was
    called, and differentiates the loss of that copy. It is pure: the model is
    never touched, and whatever the adversarial pass changes in the copy is
    discarded.

    The stateful-SAM rule (``docs/in_your_model.md``, the same in ``ars2_torch``): build it
    **before** the base pass, as below. Then the adversarial pass

    * draws the base pass's random numbers (the same dropout masks: the
      adversarial gradient is the gradient of the same stochastic objective,
      so the shear force carries no dropout noise), and
    * leaves the batch statistics as the base pass updated them (BatchNorm in
      training mode normalizes with the batch's own statistics in both passes;
      only the running averages the adversarial pass would add are dropped).

    So the model after a step with SAM, sync or not, is the model after the same
    step without SAM. Built after the base pass it still works, with fresh
    dropout masks.

    Args:
      model: the model being trained.
      loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (the same function
        whose ``nnx.grad`` gives the base gradients).
      *args: the batch, passed on to ``loss_fn``.
      wrt: the filter the optimizer was built with (``nnx.Param``,
        ``nnx.LoRAParam``, ...).
      **kwargs: passed on to ``loss_fn``.

    Returns:
      ``grad_fn(params) -> grads``, with ``grads`` shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import ars2_jax
      >>> from ars2_jax.training import nnx_grad_fn
      >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
      ...                        nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
      ...                        nnx.Dropout(0.2, rngs=nnx.Rngs(dropout=1)))
      >>> optimizer = nnx.Optimizer(model, ars2_jax.ars2_neo(1e-2, rho=0.05, k=1), wrt=nnx.Param)
      >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
      >>> x = jnp.ones((4, 3))
      >>> grad_fn = nnx_grad_fn(model, loss_fn, x)  # before the base pass
      >>> grads = nnx.grad(loss_fn)(model, x)
      >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)
    # Pure arrays, merged into new Variables inside the caller's trace: Variables
    # of the model itself cannot be mutated from under jax.grad or lax.cond.
    rest = nnx.as_pure(rest)

    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params, rest), *args, **kwargs)

    return jax.grad(loss_of)


def accumulated_grad_fn(
    grad_fn: Callable[[Any, Any], Any], micro_batches: Any
) -> Callable[[Any], Any]:
    """``params -> grads``: the mean of ``grad_fn(params, micro_batch)`` over the micro-batches.

    Gradient accumulation for ARS2-Neo: use the returned function for the base
    gradient and as ``grad_fn``, so that one step sees the large batch's
    gradient at ``θ`` and, on sync steps, at ``θ + e``. With a mean loss and
    micro-batches of one size this is the large-batch step (up to rounding), for
    every SAM mode. The micro-batches run one after another under
    :func:`jax.lax.scan`, so memory is that of one micro-batch.

    ``optax.MultiSteps`` does not do this: it calls the optimizer on every
    micro-step, so Newton-Schulz runs on every micro-step (its results discarded
    but the last), and on the emitting micro-step ``grad_fn`` sees only that
    micro-batch: the adversarial gradient is the last micro-batch's, not the
    accumulated batch's.

    Args:
      grad_fn: ``grad_fn(params, micro_batch) -> grads``, e.g. ``jax.grad(loss)``.
      micro_batches: a tree whose leaves have a leading micro-batch axis.

    Returns:
      ``grad_fn(params) -> grads``, shaped like the params.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import ars2_jax
      >>> from ars2_jax.training import accumulated_grad_fn
      >>> params = {"w": jnp.ones((3, 2))}
      >>> loss = lambda p, batch: jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)
      >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros((8, 2))}
      >>> micro_batches = jax.tree.map(lambda a: a.reshape(4, 2, *a.shape[1:]), batch)
      >>> grad_fn = accumulated_grad_fn(jax.grad(loss), micro_batches)
      >>> tx = ars2_jax.ars2_neo(1e-2, rho=0.05, k=1)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      >>> bool(jnp.allclose(grad_fn(params)["w"], jax.grad(loss)(params, batch)["w"]))
      True
    """
    count = jax.tree.leaves(micro_batches)[0].shape[0]

    def accumulated(params):
        def add(total, micro_batch):
            grads = grad_fn(params, micro_batch)
            return jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads), None

        # Sums accumulate in at least float32, whatever the params' dtype.
        zeros = jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)),
            params,
        )
        total, _ = jax.lax.scan(add, zeros, micro_batches)
        return jax.tree.map(lambda t, p: (t / count).astype(jnp.result_type(p)), total, params)

    return accumulated


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` with ``batch_stats``, forwarding ``grad_fn``.

    ``apply_gradients(grads=..., grad_fn=...)`` hands ``grad_fn`` to the optimizer;
    ``batch_stats`` holds a Linen model's BatchNorm statistics (``None`` without).

    The stateful-SAM rule, as for :func:`nnx_grad_fn`: ``grad_fn`` evaluates the
    loss with the batch statistics the step started from and the base pass's
    dropout key, and drops the statistics it computes; the state keeps those of
    the base pass. So the state after a step with SAM is the state after the same
    step without SAM, and both passes draw the same dropout masks.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import ars2_jax
      >>> from ars2_jax.training import TrainState
      >>> class Model(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...         return nn.Dense(1)(nn.Dropout(0.2, deterministic=not train)(x))
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
      >>> variables = Model().init(jax.random.key(0), x, train=False)
      >>> state = TrainState.create(apply_fn=Model().apply, params=variables["params"],
      ...                           batch_stats=variables["batch_stats"],
      ...                           tx=ars2_jax.ars2_neo(1e-2, rho=0.05, k=1))
      >>> def loss_fn(params, batch_stats, key):
      ...     out, mutated = state.apply_fn(
      ...         {"params": params, "batch_stats": batch_stats}, x, train=True,
      ...         rngs={"dropout": key}, mutable=["batch_stats"])
      ...     return jnp.mean((out - y) ** 2), mutated["batch_stats"]
      >>> @jax.jit
      ... def train_step(state, key):
      ...     (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      ...         state.params, state.batch_stats, key)
      ...     grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(p, state.batch_stats, key)[0]
      ...     return state.apply_gradients(grads=grads, grad_fn=grad_fn, batch_stats=batch_stats)
      >>> state = train_step(state, jax.random.key(1))
      >>> int(state.step)
      1
    """

    batch_stats: Any = None

    def apply_gradients(self, *, grads: Any, grad_fn: Callable | None = None, **kwargs: Any):
        """One optimizer step; ``grad_fn(params) -> grads`` on the same batch (SAM on).

        Args:
          grads: the base gradients, shaped like ``params``.
          grad_fn: ``params -> grads`` on the same batch; needed when SAM is on.
          **kwargs: other fields to replace, e.g. ``batch_stats=``.

        Returns:
          The state after the step.
        """
        extra = {} if grad_fn is None else {"grad_fn": grad_fn}
        updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=new_opt_state,
            **kwargs,
        )
