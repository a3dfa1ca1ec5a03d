"""The two workloads of ``python -m benchmarks.step_time``, in both frameworks.

(a) ``grokking``: the one-layer transformer of SPEC §7 (:mod:`models.grokking`) on a batch of
    512 of its real training data; timed as the optimizer update alone and as the full
    train step (loss, gradient, update).
(b) ``gpt2``: a GPT-2-small-shaped parameter set, timed as the update alone: 12 blocks of
    d_model 768, each with the attention kernels 768×2304 (QKV) and 768×768 (output), the MLP
    kernels 768×3072 and 3072×768, two layer norms and the biases; the 50257×768 token
    embedding (on the AdamW track by SPEC §1, on Adam for Muon) and the final layer norm.
    124M parameters, 48 matrices for Newton-Schulz. (No position embedding: it would put a
    1024×768 matrix on the ARS2 track that Muon's routing leaves to Adam.)

(c) ``nnx_lm``: the tests' NNX transformer LM (:mod:`models.nnx_transformer`: ``nnx.Embed``,
    ``nnx.MultiHeadAttention``, ``nnx.LayerNorm``, ``nnx.Dropout``, MLP) at d_model 128, 2 layers,
    4 heads, sequence 64, batch 32, timed as the full train step through ``nnx.Optimizer``.

Each workload has a ``"tiny"`` scale with the same structure, for the test.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import MuonDimensionNumbers

from experiments import grokking
from models.grokking import GrokkingConfig, Transformer
from models.nnx_transformer import LMConfig

SCALES = ("full", "tiny")


# --- (a) the grokking transformer --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GrokkingScale:
    model: GrokkingConfig
    batch_size: int
    train_fraction: float


GROKKING_SCALES = {
    "full": GrokkingScale(GrokkingConfig(), 512, 0.3),
    # The model of configs/grokking/tiny.toml.
    "tiny": GrokkingScale(
        GrokkingConfig(p=23, d_model=32, n_heads=2, d_head=16, d_mlp=64), 64, 0.5
    ),
}


@dataclasses.dataclass
class Grokking:
    """The model, its initial params and two batches of real training data.

    ``batches[0]`` is the batch of every timed step; ``batches[1]`` gives the
    stand-in adversarial gradient of the update-alone timings.
    """

    scale: GrokkingScale
    model: Transformer
    params: dict[str, jax.Array]
    batches: list[tuple[jax.Array, jax.Array, jax.Array]]  # (x, y, mask)

    @property
    def n_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))


def grokking_workload(scale: str = "full", seed: int = 0) -> Grokking:
    config = GROKKING_SCALES[scale]
    model = Transformer(config.model)
    params = grokking.init_params(model, seed)
    data = grokking.make_data(config.model.p, config.train_fraction, split_seed=seed)
    indices, masks = grokking.epoch_order(
        jax.random.key(seed + grokking.ORDER_KEY_OFFSET),
        0,
        len(data.train_y),
        config.batch_size,
    )
    train_x, train_y = jnp.asarray(data.train_x), jnp.asarray(data.train_y)
    batches = [(train_x[indices[i]], train_y[indices[i]], masks[i]) for i in range(2)]
    return Grokking(config, model, params, batches)


def grokking_muon_2d(params: dict[str, Any]) -> list[str]:
    """The 2-D matrices the seed's Muon routing orthogonalizes (``torch.optim.Muon`` takes
    no 3-D tensor): ``W_O``, ``W_in``, ``W_out``."""
    dims = grokking.muon_dimension_numbers(params)
    return [name for name, dim in dims.items() if dim is not None and params[name].ndim == 2]


# --- (b) a GPT-2-small-shaped parameter set ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPT2Shape:
    blocks: int
    d_model: int
    vocab: int


# The tiny vocabulary keeps the embedding at the 10000 rows that send it to AdamW (SPEC §1).
GPT2_SHAPES = {"full": GPT2Shape(12, 768, 50257), "tiny": GPT2Shape(2, 64, 10000)}


def gpt2_shapes(shape: GPT2Shape) -> dict[str, tuple[int, ...]]:
    """Flat parameter names → Flax-layout shapes (kernels ``(in, out)``)."""
    d = shape.d_model
    shapes: dict[str, tuple[int, ...]] = {"wte.embedding": (shape.vocab, d)}
    for i in range(shape.blocks):
        block = {
            "ln_1.scale": (d,),
            "ln_1.bias": (d,),
            "attn.c_attn.kernel": (d, 3 * d),
            "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.kernel": (d, d),
            "attn.c_proj.bias": (d,),
            "ln_2.scale": (d,),
            "ln_2.bias": (d,),
            "mlp.c_fc.kernel": (d, 4 * d),
            "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.kernel": (4 * d, d),
            "mlp.c_proj.bias": (d,),
        }
        shapes.update({f"h{i}.{name}": value for name, value in block.items()})
    shapes.update({"ln_f.scale": (d,), "ln_f.bias": (d,)})
    return shapes


def is_gpt2_matrix(name: str) -> bool:
    """The block kernels: the tensors ARS2-Neo's default rule and Muon's routing orthogonalize."""
    return name.endswith(".kernel")


def gpt2_n_params(shape: GPT2Shape) -> int:
    return sum(math.prod(s) for s in gpt2_shapes(shape).values())


def gpt2_jax(shape: GPT2Shape, seed: int = 0, dtype=jnp.float32):
    """``(params, grads, adversarial_grads)``: flat dicts of random arrays, Flax layout.

    Drawn with NumPy, which is much faster than JAX's counter-based generator on a CPU
    for the 370M numbers of the full shape.
    """
    rng = np.random.default_rng(seed)
    trees = []
    for scale in (0.02, 1e-3, 1e-3):
        tree = {}
        for name, s in gpt2_shapes(shape).items():
            values = rng.standard_normal(s, dtype=np.float32)
            values *= scale
            tree[name] = jnp.asarray(values, dtype)
        trees.append(tree)
    return tuple(trees)


def gpt2_muon_dimension_numbers(params: dict[str, Any]) -> dict[str, Any]:
    """Muon on the block kernels (rows: the ``in`` axis), Adam on the rest (``None``)."""
    kernel = MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    return {name: kernel if is_gpt2_matrix(name) else None for name in params}


def gpt2_torch(shape: GPT2Shape, seed: int = 0):
    """``(params, grads, adversarial_grads)``: lists of torch tensors in the PyTorch layout
    (``Linear`` weights ``(out, in)``), in the order of :func:`gpt2_shapes`, and their names."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    names, params, grads, adversarial = [], [], [], []
    for name, s in gpt2_shapes(shape).items():
        if is_gpt2_matrix(name):
            s = s[::-1]
        names.append(name)
        params.append(torch.nn.Parameter(0.02 * torch.randn(s, generator=generator)))
        grads.append(1e-3 * torch.randn(s, generator=generator))
        adversarial.append(1e-3 * torch.randn(s, generator=generator))
    return names, params, grads, adversarial


def tree_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (``optax.MaskedNode`` holds none)."""
    return sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree))


# --- (c) the NNX transformer LM ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NNXLMScale:
    model: LMConfig
    batch_size: int


NNX_LM_SCALES = {
    "full": NNXLMScale(LMConfig(), 32),
    "tiny": NNXLMScale(LMConfig(vocab=32, d_model=16, heads=2, layers=1, d_mlp=32, max_len=8), 4),
}


def nnx_lm_tokens(scale: NNXLMScale, seed: int = 0) -> jax.Array:
    """A batch of random tokens, one longer than the model's context (inputs and targets)."""
    shape = (scale.batch_size, scale.model.max_len + 1)
    return jax.random.randint(jax.random.key(seed), shape, 0, scale.model.vocab)
