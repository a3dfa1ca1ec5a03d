"""The PyTorch path of the grokking experiment: the same epochs through ``torch.optim``.

Same split, same batch order and the same initial weights as the JAX path
(:mod:`experiments.grokking`), so that the two differ only in the optimizer's
implementation: ``ars2_torch.ARS2Neo``, ``torch.optim.AdamW`` or the reference Muon.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from experiments import common, grokking


def train(config, settings, data, model, params, recorder, previous) -> dict[str, float]:
    import torch

    from ars2_torch import checkpoint
    from models.grokking_torch import from_flax_params

    batch_size = config["train"].get("batch_size", 512)
    net = from_flax_params(model.config, params)
    is_muon = config["optimizer"]["name"] == "muon"
    muon_names = [n for n, d in grokking.muon_dimension_numbers(params).items() if d is not None]
    optimizer = common.torch_optimizer(config["optimizer"], net, muon_names=muon_names)
    train_x, train_y = torch.from_numpy(data.train_x).long(), torch.from_numpy(data.train_y).long()
    test_x, test_y = torch.from_numpy(data.test_x).long(), torch.from_numpy(data.test_y).long()
    order_key = jax.random.key(settings.seed + grokking.ORDER_KEY_OFFSET)
    n_train = len(data.train_y)
    orders = jax.jit(
        functools.partial(grokking.epoch_order, n_train=n_train, batch_size=batch_size)
    )
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"
    start_epoch = 1
    if settings.resume is not None:
        saved = checkpoint.load(grokking.checkpoint_dir(settings, resuming=True))
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch = saved["epoch"] + 1
        recorder.restore_history([row for row in previous if row["epoch"] < start_epoch])

    def run_epoch(epoch):
        indices, masks = jax.device_get(orders(order_key, epoch - 1))
        loss_sum = correct = count = 0.0
        for index, mask in zip(indices, masks):
            index = torch.from_numpy(index[mask > 0].astype(np.int64))
            x, y = train_x[index], train_y[index]
            first_pass = []

            def closure(x=x, y=y, first_pass=first_pass):
                logits = net(x)[:, -1]
                loss = torch.nn.functional.cross_entropy(logits, y)
                loss.backward()
                if not first_pass:
                    first_pass.append((loss.item(), (logits.argmax(-1) == y).sum().item()))
                return loss

            optimizer.zero_grad()
            if is_muon:  # the reference Muon's step() takes no closure
                closure()
                optimizer.step()
            else:
                optimizer.step(closure)
            loss_sum += first_pass[0][0] * len(y)
            correct += first_pass[0][1]
            count += len(y)
        with torch.no_grad():
            logits = net(test_x)[:, -1]
            eval_metrics = {
                "loss": torch.nn.functional.cross_entropy(logits, test_y).item(),
                "acc": (logits.argmax(-1) == test_y).float().mean().item(),
            }
        diagnostics = optimizer.diagnostics if is_ars2 else {}
        return {"loss": loss_sum / count, "acc": correct / count}, eval_metrics, diagnostics

    def save(epoch):
        checkpoint.save_step(
            grokking.checkpoint_dir(settings),
            epoch,
            keep=settings.keep,
            model=net,
            optimizer=optimizer,
            epoch=epoch,
        )

    grokking.run_epochs(config, settings, recorder, run_epoch, start_epoch, save)
    return {}
