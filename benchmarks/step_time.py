"""Step time of ARS2-Neo against AdamW and Muon, in JAX and PyTorch, interleaved.

    python -m benchmarks.step_time                      # both workloads, float32 Newton-Schulz
    python -m benchmarks.step_time --workload a --ns-dtype bfloat16 --rounds 50
    python -m benchmarks.step_time --quick --scale tiny --workload a --out /tmp/bench
    python -m benchmarks.step_time --workload c       # the NNX transformer LM only

Three workloads (:mod:`benchmarks.workloads`): (a) the grokking transformer with a batch of
512, timed as the optimizer update alone (``tx.update`` + ``apply_updates`` on precomputed
gradients, one jitted call) and as the full train step (loss, gradient, update); (b) a
GPT-2-small-shaped parameter set (124M parameters, 48 matrices), update alone; (c) an NNX
transformer LM built from Flax's modules (d_model 128, 2 layers, 4 heads, sequence 64,
batch 32), the full step through ``nnx.Optimizer`` with the views of
``ars2_jax.training.nnx_matrix_views``: AdamW, ARS2-Neo base and sync.

All candidates of a workload (both frameworks, every optimizer, every section) are timed
in one process, round-robin: each round calls every candidate once, starting one
candidate further along than the round before, so that the slow phases of a shared
machine hit all of them alike. Compilation and warm-up calls are not timed; every call
blocks until its results are ready. The tables give the median over the rounds and
ratios of medians; ``benchmarks/results/<machine>-<date>.json`` keeps every sample.

* Muon is ``optax.contrib.muon`` with the seed's routing (embeddings, unembedding and
  biases on Adam) and ``torch.optim.Muon``, which takes only 2-D tensors and iterates in
  bfloat16: it is timed on the 2-D matrices against ``ARS2Neo`` on the same tensors with a
  bfloat16 Newton-Schulz.
* ARS2-Neo runs the grokking configs' hyperparameters (``configs/grokking``): base, sync
  (``k=1``), delayed (``k=10``), adaptive (A-GSAM); and base with one Newton-Schulz call per
  matrix shape or one per leaf (``group_same_shapes``; the default groups except on CPUs,
  where one call per leaf is faster). In the update-alone
  timings ``grad_fn`` returns a precomputed gradient tree (in PyTorch, the closure hands
  precomputed gradient tensors), so that only the optimizer's own work is timed.
* The delayed and adaptive steps contain the real ``lax.cond`` (in PyTorch, the real
  branch), whose branches cost differently. Each branch is timed with the decision
  forced through the optimizer state (:func:`benchmarks.candidates.force_branch`), and the
  mode's time is their mix at its sync rate, ``(T_sync + (k - 1)·T_other) / k``: ``k = 10``
  for delayed and, for adaptive, the ``effective_k`` of a short real A-GSAM run (the first
  epochs of grokking, through the same compiled step with the decision left to the
  optimizer).

On a CPU, workload (b) times by default only the rows of the targets (AdamW, Muon, ARS2-Neo
base and base grouped by shape; in PyTorch AdamW and base): one Newton-Schulz pass over its 48
matrices is about 1.5 TFLOP, tens of seconds on two cores. ``--optimizers`` and
``--torch-b all`` time the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import re
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/step_time.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax

import ars2_jax
from benchmarks import candidates as cand
from benchmarks import report as rep
from benchmarks import workloads
from benchmarks.machine import describe
from experiments import common, grokking
from models.nnx_transformer import TransformerLM, next_token_loss

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
NS_DTYPES = ("float32", "bfloat16")
# ARS2-Neo's default: one Newton-Schulz call per matrix shape, except on CPUs (one per leaf).
DEFAULT_GROUPED = jax.default_backend() != "cpu"
# The base variant with the other grouping than the default's.
OTHER_GROUPING = "ars2_base_per_leaf" if DEFAULT_GROUPED else "ars2_base_grouped"
DEFAULT_ROWS_A = tuple(name for name in cand.CHOICES if name not in cand.GROUPING)
DEFAULT_ROWS_B = tuple(n for n in cand.CHOICES if n not in cand.GROUPING or n == OTHER_GROUPING)
# (b) on a CPU: the rows of the targets.
CPU_ROWS_B = ("adamw", "muon", "ars2_base", OTHER_GROUPING)


@dataclasses.dataclass
class Settings:
    workloads: tuple[str, ...] = ("a", "b", "c")
    ns_dtype: str = "float32"
    scale: str = "full"  # a key of workloads.SCALES
    rounds_a: int = 20
    rounds_b: int = 2
    rounds_c: int = 20
    optimizers: tuple[str, ...] | None = None  # None: the defaults of each workload
    effective_k_epochs: int = 10
    effective_k: float | None = None  # None: measured by a short A-GSAM run
    torch_b: str = "auto"  # "auto": every row on a GPU, AdamW and base on a CPU; "all"; "none"
    out_dir: pathlib.Path = RESULTS_DIR
    quiet: bool = False


def interleaved(candidates: list[cand.Candidate], rounds: int, log) -> dict[str, list[float]]:
    """Warm-up calls, then ``rounds`` rounds calling every candidate once, in rotated order."""
    for candidate in candidates:
        for _ in range(candidate.warmup):
            candidate.run()
    samples: dict[str, list[float]] = {c.key: [] for c in candidates}
    n = len(candidates)
    for r in range(rounds):
        round_start = time.perf_counter()
        for candidate in candidates[r % n :] + candidates[: r % n]:
            start = time.perf_counter()
            candidate.run()
            samples[candidate.key].append(time.perf_counter() - start)
        log(f"  round {r + 1}/{rounds}: {time.perf_counter() - round_start:.1f} s")
    return samples


def effective_k_of_short_run(work: workloads.Grokking, program, tx, epochs: int) -> float:
    """A-GSAM's ``effective_k`` after ``epochs`` epochs of real training from the initial weights.

    ``program`` is the compiled full step, run with the decision left to the optimizer;
    the data split and the shuffled order are the grokking experiment's for seed 0.
    """
    scale = work.scale
    data = grokking.make_data(scale.model.p, scale.train_fraction, split_seed=0)
    train_x, train_y = jnp.asarray(data.train_x), jnp.asarray(data.train_y)
    order_key = jax.random.key(grokking.ORDER_KEY_OFFSET)
    params = jax.tree.map(jnp.copy, work.params)
    state = tx.init(work.params)
    unforced = jnp.asarray(cand.BRANCH_CODES[None], jnp.int32)
    for epoch in range(epochs):
        indices, masks = grokking.epoch_order(order_key, epoch, len(train_y), scale.batch_size)
        for index, mask in zip(indices, masks):
            params, state, _ = program(
                params, state, train_x[index], train_y[index], mask, unforced
            )
    return float(ars2_jax.diagnostics(state)["effective_k"])


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def newton_schulz_flops(params: Any, ns_steps: int, ns_dtype: str) -> float:
    """XLA's FLOP count of ARS2-Neo's Newton-Schulz over the ARS2 track of ``params``.

    XLA counts the body of a ``fori_loop`` once, whatever its trip count: the other
    ``ns_steps - 1`` iterations come from :func:`experiments.common.newton_schulz_loop_flops`.
    """
    labels = ars2_jax.default_param_labels(params)
    matrices = {
        name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        for name, leaf in params.items()
        if labels[name] == "ars2"
    }
    transform = ars2_jax.orthogonalize_with_energy(ns_steps, common.DTYPES[ns_dtype])
    lowered = jax.jit(lambda u: transform.update(u, optax.EmptyState())[0]).lower(matrices)
    return _flops(lowered.compile()) + common.newton_schulz_loop_flops(matrices, ns_steps)


def forward_backward_flops(work: workloads.Grokking) -> float:
    x, y, mask = work.batches[0]
    loss = lambda p: grokking.batch_loss(work.model, p, x, y, mask)[0]
    return _flops(jax.jit(jax.grad(loss)).lower(work.params).compile())


def run_workload_a(settings: Settings, configs, log) -> dict[str, Any]:
    import torch

    from models.grokking_torch import from_flax_params

    names = settings.optimizers or DEFAULT_ROWS_A
    work = workloads.grokking_workload(settings.scale)
    dims = grokking.muon_dimension_numbers(work.params)
    loss_grad = jax.jit(jax.grad(lambda p, *b: grokking.batch_loss(work.model, p, *b)[0]))
    grads, adversarial = (loss_grad(work.params, *batch) for batch in work.batches)
    registry = cand.Registry()
    warmup = lambda name: 1
    log("(a) compiling the JAX update and train steps")
    common_args = (work.params, configs, dims, settings.ns_dtype, registry, warmup)
    candidates = cand.jax_candidates("a", "update", names, *common_args, (grads, adversarial))
    step_names = [name for name in names if name not in cand.GROUPING]
    candidates += cand.jax_candidates(
        "a", "step", step_names, *common_args, work.batches[0], model=work.model
    )

    effective_k = {"ars2_delayed": float(cand.DELAYED_K)}
    how = None
    if "ars2_adaptive" in step_names:
        if settings.effective_k is None:
            log("(a) effective_k of a short A-GSAM run")
            tx = cand.jax_optimizer("ars2_adaptive", configs, dims, settings.ns_dtype)
            program = registry.programs["a/step/ars2_adaptive"]
            value = effective_k_of_short_run(work, program, tx, settings.effective_k_epochs)
            how = (
                f"{value:.2f}, measured over the first {settings.effective_k_epochs} epochs of "
                "the grokking A-GSAM config (seed 0) through the timed step, unforced"
            )
        else:
            value = settings.effective_k
            how = f"{value:.2f}, given on the command line"
        effective_k["ars2_adaptive"] = value

    device = cand.torch_device()
    to_torch = lambda array: torch.from_numpy(jax.device_get(array).copy()).to(device)
    net = from_flax_params(work.model.config, work.params).to(device)
    tensors = [getattr(net, name) for name in work.params]
    torch_names = [name for name in names if name in cand.TORCH_CHOICES]
    candidates += cand.torch_update_candidates(
        "a",
        torch_names,
        tensors,
        [to_torch(grads[name]) for name in work.params],
        [to_torch(adversarial[name]) for name in work.params],
        configs,
        registry,
        warmup,
    )
    if "muon" in names:
        net_2d = from_flax_params(work.model.config, work.params).to(device)
        names_2d = workloads.grokking_muon_2d(work.params)
        candidates += cand.torch_2d_candidates(
            "a",
            [getattr(net_2d, name) for name in names_2d],
            [to_torch(grads[name]) for name in names_2d],
            configs,
            registry,
            warmup,
        )
    candidates += cand.torch_step_candidates(work, torch_names, configs, warmup)

    log(f"(a) timing {len(candidates)} candidates, {settings.rounds_a} rounds")
    samples = interleaved(candidates, settings.rounds_a, log)
    forward_backward = forward_backward_flops(work)
    newton_schulz = newton_schulz_flops(work.params, 5, settings.ns_dtype)
    result = {
        "description": (
            f"grokking transformer (p {work.scale.model.p}, d_model {work.scale.model.d_model}),"
            f" batch {work.scale.batch_size}"
        ),
        "n_params": work.n_params,
        "samples": samples,
        "effective_k": effective_k,
        "flops": {
            "forward_backward": forward_backward,
            "newton_schulz": newton_schulz,
            "floor_ratio": (forward_backward + newton_schulz) / forward_backward,
        },
        "memory": registry.memory_rows(),
        "not_timed": [],
    }
    if how is not None:
        result["effective_k_how"] = how
    return result


def run_workload_b(settings: Settings, configs, log) -> dict[str, Any]:
    import torch

    on_cpu = jax.default_backend() == "cpu"
    names = settings.optimizers or (CPU_ROWS_B if on_cpu else DEFAULT_ROWS_B)
    shape = workloads.GPT2_SHAPES[settings.scale]
    log("(b) building the GPT-2-small-shaped parameters")
    params, grads, adversarial = workloads.gpt2_jax(shape)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    dims = workloads.gpt2_muon_dimension_numbers(params)
    registry = cand.Registry()
    # On a CPU one Newton-Schulz pass takes tens of seconds: no warm-up call beyond the
    # compilation for the steps that run one.
    warmup = lambda name: 1 if name == "adamw" or not on_cpu else 0
    log("(b) compiling the JAX updates")
    candidates = cand.jax_candidates(
        "b",
        "update",
        names,
        params,
        configs,
        dims,
        settings.ns_dtype,
        registry,
        warmup,
        (grads, adversarial),
    )
    del params
    not_timed = []
    torch_all = settings.torch_b == "all" or (settings.torch_b == "auto" and not on_cpu)
    if settings.torch_b != "none":
        device = cand.torch_device()
        tensor_names, tensors, torch_grads, torch_adversarial = workloads.gpt2_torch(shape)
        tensors = [torch.nn.Parameter(t.detach().to(device)) for t in tensors]
        torch_grads = [g.to(device) for g in torch_grads]
        torch_adversarial = [g.to(device) for g in torch_adversarial]
        allowed = cand.TORCH_CHOICES if torch_all else ("adamw", "ars2_base")
        candidates += cand.torch_update_candidates(
            "b",
            [name for name in names if name in allowed],
            tensors,
            torch_grads,
            torch_adversarial,
            configs,
            registry,
            warmup,
        )
        if torch_all and "muon" in names:
            matrices = [i for i, name in enumerate(tensor_names) if workloads.is_gpt2_matrix(name)]
            candidates += cand.torch_2d_candidates(
                "b",
                [tensors[i] for i in matrices],
                [torch_grads[i] for i in matrices],
                configs,
                registry,
                warmup,
            )
        elif not torch_all:
            not_timed.append(
                "PyTorch on (b) on a CPU times AdamW and ARS2-Neo base only: the SAM modes add "
                "elementwise work (see (a)), and the bfloat16 2-D comparison would take "
                "minutes per step (PyTorch's bfloat16 matmuls on this CPU: `torch.optim.Muon` "
                "needs about a minute for one 768×3072 matrix); `--torch-b all` times them"
            )
    if on_cpu and settings.optimizers is None:
        not_timed.append(
            "the SAM modes on (b) (a CPU default; `--optimizers` adds them): their extra "
            "work over base is elementwise, measured on (a)"
        )
    log(f"(b) timing {len(candidates)} candidates, {settings.rounds_b} rounds")
    samples = interleaved(candidates, settings.rounds_b, log)
    return {
        "description": (
            f"GPT-2-small-shaped parameters ({shape.blocks} blocks of d_model {shape.d_model}, "
            f"vocabulary {shape.vocab}), update alone"
        ),
        "n_params": workloads.gpt2_n_params(shape),
        "samples": samples,
        "effective_k": {"ars2_delayed": float(cand.DELAYED_K)},
        "default_grouped": DEFAULT_GROUPED,
        "flops": {"newton_schulz": newton_schulz_flops(shapes, 5, settings.ns_dtype)},
        "memory": registry.memory_rows(),
        "not_timed": not_timed,
    }


NNX_ROWS = ("adamw", "ars2_base", "ars2_sync")


def _nnx_optimizer(name: str, model, ns_dtype: str):
    from flax import nnx

    from ars2_jax.training import nnx_matrix_views

    if name == "adamw":
        return optax.adamw(1e-3, weight_decay=0.01)
    sam = dict(rho=0.05, k=1) if name == "ars2_sync" else {}
    return ars2_jax.ars2_neo(
        1e-3, ns_dtype=common.DTYPES[ns_dtype], **sam, **nnx_matrix_views(model, nnx.Param)
    )


def nnx_newton_schulz_loop_flops(model, ns_steps: int) -> float:
    """The ``ns_steps - 1`` Newton-Schulz iterations XLA's count misses, on the model's views."""
    from flax import nnx

    from ars2_jax.training import nnx_matrix_views

    views = nnx_matrix_views(model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    labels = jax.tree.leaves(views["param_labels"])
    dims = jax.tree.structure(params).flatten_up_to(views["weight_dimension_numbers"])
    total = 0.0
    for label, dim, leaf in zip(labels, dims, jax.tree.leaves(params)):
        if label != "ars2":
            continue
        dim = dim or ars2_jax.default_dimension_numbers(leaf.ndim)
        axes = lambda a: (a,) if isinstance(a, int) else tuple(a)
        rows = math.prod(leaf.shape[a] for a in axes(dim.reduction_axis))
        cols = math.prod(leaf.shape[a] for a in axes(dim.output_axis))
        small, large = sorted((rows, cols))
        total += leaf.size // (rows * cols) * (4 * small * small * large + 2 * small**3)
    return total * (ns_steps - 1)


def run_workload_c(settings: Settings, configs, log) -> dict[str, Any]:
    from flax import nnx

    from ars2_jax.training import nnx_grad_fn

    del configs
    names = [name for name in (settings.optimizers or NNX_ROWS) if name in NNX_ROWS]
    scale = workloads.NNX_LM_SCALES[settings.scale]
    tokens = workloads.nnx_lm_tokens(scale)
    candidates, flops, n_params = [], {}, 0
    log("(c) compiling the NNX train steps")
    for name in names:
        model = TransformerLM(scale.model, nnx.Rngs(0, dropout=1))
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        optimizer = nnx.Optimizer(
            model, _nnx_optimizer(name, model, settings.ns_dtype), wrt=nnx.Param
        )
        graphdef, state = nnx.split((model, optimizer))
        sam = name == "ars2_sync"

        def step(state, tokens, graphdef=graphdef, sam=sam):
            model, optimizer = nnx.merge(graphdef, state)
            extra = {"grad_fn": nnx_grad_fn(model, next_token_loss, tokens)} if sam else {}
            loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens)
            optimizer.update(model, grads, **extra)
            return nnx.state((model, optimizer)), loss

        compiled = jax.jit(step, donate_argnums=0).lower(state, tokens).compile()
        flops[name] = _flops(compiled)
        if name != "adamw":
            flops[name] += nnx_newton_schulz_loop_flops(model, 5)
        slot = cand.Slot(state)

        def run(slot=slot, compiled=compiled):
            slot.value, loss = compiled(slot.value, tokens)
            jax.block_until_ready((slot.value, loss))

        candidates.append(cand.Candidate("c", "step", "jax", name, run))
    log(f"(c) timing {len(candidates)} candidates, {settings.rounds_c} rounds")
    samples = interleaved(candidates, settings.rounds_c, log)
    config = scale.model
    result = {
        "description": (
            f"NNX transformer LM (d_model {config.d_model}, {config.layers} layers, "
            f"{config.heads} heads, sequence {config.max_len}, batch {scale.batch_size}), "
            "full step through nnx.Optimizer"
        ),
        "n_params": n_params,
        "samples": samples,
        "effective_k": {},
        "flops": {f"step_{name}": value for name, value in flops.items()},
        "memory": [],
        "not_timed": [],
    }
    if "adamw" in flops:
        result["flop_ratio"] = {
            name: value / flops["adamw"] for name, value in flops.items() if name != "adamw"
        }
    return result


NOTES = [
    "Update alone: `tx.update` + `optax.apply_updates` on precomputed gradients in one jitted "
    "call, params and state donated; `grad_fn` returns a precomputed gradient tree. PyTorch: "
    "`opt.step()` with the gradients set by reference (SAM modes: a closure that sets them). "
    "Full step: loss, gradient and update of one batch in one jitted call (PyTorch: "
    "`zero_grad`, then a closure with forward and backward, `step`).",
    "Delayed and adaptive: each branch of the step's `lax.cond` is timed with the decision "
    "forced through the optimizer state; the mode's row mixes them as "
    "`(T_sync + (k - 1)·T_other) / k`.",
    "Muon: `optax.contrib.muon` with the seed's routing (attention and MLP matrices, Q/K/V per "
    "head, on Muon; embeddings, unembedding, biases on Adam); on (b) the block kernels on Muon, "
    "the embedding and the norms on Adam. optax iterates in its momentum's dtype: for a "
    "bfloat16 comparison its momentum is bfloat16 and the Muon leaves' gradients are cast to "
    "bfloat16. ARS2-Neo's bfloat16 Newton-Schulz rounds matmul inputs to bfloat16 and "
    "accumulates in float32.",
    "`torch.optim.Muon` takes only 2-D tensors and always iterates in bfloat16: the section "
    "'update alone, 2-D matrices, bf16 NS' times it and `ARS2Neo(ns_dtype=torch.bfloat16)` on "
    "the same tensors (grokking: W_O, W_in, W_out; GPT-2: the 48 block kernels).",
    "ARS2-Neo base, NS grouped by shape / per leaf: the composition of `ars2_neo` with "
    "`orthogonalize_with_energy(group_same_shapes=True / False)`: one Newton-Schulz call per "
    "matrix shape (the matrices of every leaf of that shape stacked) or one per tensor. "
    "`ars2_neo`'s default groups on GPUs and TPUs and not on CPUs.",
    "Optimizer state: the bytes of the state (JAX: the state pytree; PyTorch: the tensors in "
    "`optimizer.state`) over the parameters the optimizer updates. ARS2-Neo keeps Adam's m and "
    "v (8 bytes per float32 parameter) and, in the delayed and adaptive modes, the shear force "
    "(4 more); sync keeps no shear.",
]


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_slug(machine: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", machine.split(", Python")[0].lower()).strip("-")
    return slug or "machine"


def run(settings: Settings) -> tuple[dict[str, Any], pathlib.Path]:
    """Runs the benchmark, writes ``<machine>-<date>.json`` and ``.md``; returns the report
    and the JSON's path."""
    import torch

    start = time.perf_counter()
    quiet = lambda message: None
    log = (
        quiet
        if settings.quiet
        else (
            lambda message: print(
                f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr
            )
        )
    )
    before = load_average()
    configs = cand.optimizer_configs(settings.ns_dtype)
    runners = {"a": run_workload_a, "b": run_workload_b, "c": run_workload_c}
    results = {}
    for workload in settings.workloads:
        result = runners[workload](settings, configs, log)
        result["rows"] = rep.summarize(result)
        results[workload] = result
    now = datetime.datetime.now()
    machine = describe()
    device = cand.torch_device()
    report = {
        "machine": machine,
        "date": now.strftime("%Y-%m-%d %H:%M"),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "optax": optax.__version__,
            "torch": torch.__version__,
            "torch_device": str(device)
            + (f" {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        },
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "out_dir"},
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "load_average": {"before": before, "after": load_average()},
        "wall_seconds": time.perf_counter() - start,
        "results": results,
        "targets": rep.targets(results, settings.ns_dtype),
        "notes": NOTES,
    }
    out = pathlib.Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{machine_slug(machine)}-{now.strftime('%Y-%m-%d')}"
    for value, default in (
        ("".join(settings.workloads), "abc"),
        (settings.ns_dtype, "float32"),
        (settings.scale, "full"),
    ):
        if value != default:
            stem += f"-{value}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(rep.markdown(report))
    return report, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        choices=("a", "b", "c", "both", "all"),
        default="all",
        help="both: (a) and (b); all: (a), (b) and (c)",
    )
    parser.add_argument("--ns-dtype", choices=NS_DTYPES, default="float32")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of workload (a)")
    parser.add_argument("--rounds-b", type=int, default=2, help="rounds of workload (b)")
    parser.add_argument("--rounds-c", type=int, default=20, help="rounds of workload (c)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds of (a) and (c), 1 of (b), a 1-epoch A-GSAM run",
    )
    parser.add_argument(
        "--scale", choices=workloads.SCALES, default="full", help="tiny: small models, for tests"
    )
    parser.add_argument(
        "--optimizers",
        help=f"comma-separated rows among {', '.join(cand.CHOICES)} (default: all on (a) but "
        "the grouping variants; on (b) all on a GPU, the rows of the targets on a CPU)",
    )
    parser.add_argument("--effective-k-epochs", type=int, default=10, help="of the A-GSAM run")
    parser.add_argument("--effective-k", type=float, help="A-GSAM's effective_k, not measured")
    parser.add_argument(
        "--torch-b",
        choices=("auto", "all", "none"),
        default="auto",
        help="PyTorch rows on (b); auto: all on a GPU, AdamW and ARS2-Neo base on a CPU",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR), help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    args = parser.parse_args(argv)
    # PyTorch's OpenMP threads spin while they wait for each other; on a shared machine a
    # descheduled thread then stalls every op (AdamW on (a): 196 ms a step instead of 2.6 ms
    # on our loaded 2-core CPU). Waiting passively costs nothing measurable on an idle one.
    # It must be set before torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    optimizers = None
    if args.optimizers:
        optimizers = tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
        unknown = sorted(set(optimizers) - set(cand.CHOICES))
        if unknown:
            parser.error(f"--optimizers: unknown {unknown}; choose among {cand.CHOICES}")
    for name in ("rounds", "rounds_b", "rounds_c", "effective_k_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    settings = Settings(
        workloads={"both": ("a", "b"), "all": ("a", "b", "c")}.get(args.workload, (args.workload,)),
        ns_dtype=args.ns_dtype,
        scale=args.scale,
        rounds_a=3 if args.quick else args.rounds,
        rounds_b=1 if args.quick else args.rounds_b,
        rounds_c=3 if args.quick else args.rounds_c,
        optimizers=optimizers,
        effective_k_epochs=1 if args.quick else args.effective_k_epochs,
        effective_k=args.effective_k,
        torch_b=args.torch_b,
        out_dir=pathlib.Path(args.out),
        quiet=args.quiet,
    )
    report, path = run(settings)
    print(rep.markdown(report))
    print(f"Written: {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
