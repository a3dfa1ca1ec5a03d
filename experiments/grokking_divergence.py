"""Where do the JAX and PyTorch grokking runs part? Both step for step, side by side.

    python -m experiments.grokking_divergence --config ars2_neo_agsam --epochs 170

Starts both frameworks from the same weights on the same split and batch order
(as ``experiments/grokking.py`` does), takes one optimizer step at a time in each,
and prints, every few epochs, the SPEC §6b relative distance between their
parameters (the largest over tensors, and which tensor it is), and every step at
which their SAM sync decisions differ, with the margin ``|φ − threshold|`` each
side saw. Writes ``divergence.jsonl`` (one row per
step) under ``--out``.

``--float64`` runs both sides in float64 (params, moments, Newton-Schulz): when the
float32 runs part and the float64 runs stay together, the parting is float32
rounding amplified by training, not a difference between the implementations.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

if __package__ in (None, ""):  # `python experiments/grokking_divergence.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ars2_jax
from experiments import common, grokking


def relative_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """SPEC §6b: the largest ``‖a − b‖ / ‖b‖`` over tensors."""
    return max(float(np.linalg.norm(a[n] - b[n]) / np.linalg.norm(b[n])) for n in b)


def trace(config: dict, epochs: int, seed: int = 0, report_every: int = 10, float64: bool = False):
    """Yields one dict per step: the step, the distance, and both sides' SAM scalars."""
    import torch

    from models.grokking_torch import from_flax_params

    task, batch_size = config.get("task", {}), config["train"].get("batch_size", 512)
    data = grokking.make_data(task.get("p", 113), task.get("train_fraction", 0.3), seed)
    model = grokking.Transformer(grokking.model_config(config))
    params = grokking.init_params(model, seed)
    net = from_flax_params(model.config, params)
    dtype = jnp.float32
    if float64:
        if not jax.config.jax_enable_x64:
            raise ValueError("float64 needs jax_enable_x64 (main() sets it)")
        dtype = jnp.float64
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        net = net.double()
    torch_opt = common.torch_optimizer(config["optimizer"], net)
    tx = common.optax_optimizer(config["optimizer"])
    opt_state = tx.init(params)
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"

    @jax.jit
    def jax_step(params, opt_state, x, y):
        ones = jnp.ones(y.shape, dtype)
        loss_fn = lambda p: grokking.batch_loss(model, p, x, y, ones)[0]
        grad_fn = jax.grad(loss_fn)
        updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state

    orders = jax.jit(
        functools.partial(grokking.epoch_order, n_train=len(data.train_y), batch_size=batch_size)
    )
    order_key = jax.random.key(seed + grokking.ORDER_KEY_OFFSET)
    step = 0
    for epoch in range(epochs):
        indices, masks = jax.device_get(orders(order_key, epoch))
        for index, mask in zip(indices, masks):
            index = index[mask > 0]
            x, y = data.train_x[index], data.train_y[index]
            params, opt_state = jax_step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
            tx_, ty = torch.from_numpy(x).long(), torch.from_numpy(y).long()

            def closure(tx_=tx_, ty=ty):
                loss = torch.nn.functional.cross_entropy(net(tx_)[:, -1], ty)
                loss.backward()
                return loss

            torch_opt.zero_grad()
            torch_opt.step(closure)
            step += 1
            row = {"step": step, "epoch": epoch + 1}
            if step % report_every == 0 or step < 10:
                jax_params = {n: np.asarray(v, np.float64) for n, v in params.items()}
                torch_params = {n: p.detach().double().numpy() for n, p in net.named_parameters()}
                row["distance"] = relative_distance(jax_params, torch_params)
                row["tensor_distance"] = {
                    n: relative_distance({n: jax_params[n]}, {n: torch_params[n]})
                    for n in torch_params
                }
            if is_ars2:
                row["jax"] = {k: float(v) for k, v in ars2_jax.diagnostics(opt_state).items()}
                row["torch"] = dict(torch_opt.diagnostics)
            yield row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="ars2_neo_agsam", help="a name in configs/grokking")
    parser.add_argument("--epochs", type=int, default=170)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ns-dtype", choices=sorted(common.DTYPES))
    parser.add_argument("--float64", action="store_true", help="both sides in float64")
    parser.add_argument("--out", default="results/grokking/divergence")
    args = parser.parse_args(argv)
    config = common.load_config(grokking._config_path(args.config))
    if args.ns_dtype:
        config["optimizer"]["ns_dtype"] = args.ns_dtype
    if args.float64:
        if args.ns_dtype not in (None, "float64"):
            parser.error("--float64 runs Newton-Schulz in float64: drop --ns-dtype")
        jax.config.update("jax_enable_x64", True)
        if config["optimizer"]["name"] == "ars2_neo":
            config["optimizer"]["ns_dtype"] = "float64"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous_syncs = {"jax": 0, "torch": 0}
    with (out / "divergence.jsonl").open("w") as log:
        for row in trace(config, args.epochs, args.seed, float64=args.float64):
            log.write(json.dumps(row) + "\n")
            if "jax" in row:
                synced = {
                    side: row[side]["sync_count"] > previous_syncs[side] for side in previous_syncs
                }
                previous_syncs = {side: row[side]["sync_count"] for side in previous_syncs}
                if synced["jax"] != synced["torch"]:
                    margins = {
                        side: abs(row[side]["phi"] - row[side]["threshold"]) for side in synced
                    }
                    print(
                        f"step {row['step']} (epoch {row['epoch']}): sync jax={synced['jax']} "
                        f"torch={synced['torch']}, |phi - threshold| jax={margins['jax']:.2e} "
                        f"torch={margins['torch']:.2e}"
                    )
            if "distance" in row and (row["step"] < 10 or row["step"] % 80 == 0):
                worst = max(row["tensor_distance"], key=row["tensor_distance"].get)
                print(
                    f"step {row['step']} (epoch {row['epoch']}): distance {row['distance']:.2e} "
                    f"(largest in {worst})"
                )


if __name__ == "__main__":
    main()
