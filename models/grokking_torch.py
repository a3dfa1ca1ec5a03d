"""The PyTorch twin of :class:`models.grokking.Transformer`, used only by the torch path.

Same parameter names, shapes and arithmetic; it is never initialized on its own:
:func:`from_flax_params` loads the Flax model's initial arrays, so that both
frameworks start from identical weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.grokking import GrokkingConfig

PARAM_NAMES = (
    "W_E",
    "W_pos",
    "W_Q",
    "W_K",
    "W_V",
    "W_O",
    "W_in",
    "b_in",
    "W_out",
    "b_out",
    "W_U",
)


class TorchTransformer(nn.Module):
    def __init__(self, config: GrokkingConfig):
        super().__init__()
        c = self.config = config
        shapes = {
            "W_E": (c.d_model, c.vocab),
            "W_pos": (c.n_ctx, c.d_model),
            "W_Q": (c.n_heads, c.d_head, c.d_model),
            "W_K": (c.n_heads, c.d_head, c.d_model),
            "W_V": (c.n_heads, c.d_head, c.d_model),
            "W_O": (c.d_model, c.n_heads * c.d_head),
            "W_in": (c.d_mlp, c.d_model),
            "b_in": (c.d_mlp,),
            "W_out": (c.d_model, c.d_mlp),
            "b_out": (c.d_model,),
            "W_U": (c.d_model, c.vocab),
        }
        for name in PARAM_NAMES:
            self.register_parameter(name, nn.Parameter(torch.zeros(shapes[name])))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.W_E.T[tokens] + self.W_pos[: tokens.shape[1]]
        q = torch.einsum("hkd,bpd->bhpk", self.W_Q, x)
        k = torch.einsum("hkd,bpd->bhpk", self.W_K, x)
        v = torch.einsum("hkd,bpd->bhpk", self.W_V, x)
        scores = torch.einsum("bhqk,bhpk->bhqp", q, k) / math.sqrt(c.d_head)
        n = tokens.shape[1]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=tokens.device))
        scores = scores.masked_fill(~causal, float("-inf"))
        attention = scores.softmax(dim=-1)
        z = torch.einsum("bhqp,bhpk->bqhk", attention, v).reshape(*tokens.shape, -1)
        x = x + torch.einsum("df,bqf->bqd", self.W_O, z)
        hidden = torch.relu(torch.einsum("md,bpd->bpm", self.W_in, x) + self.b_in)
        x = x + torch.einsum("dm,bpm->bpd", self.W_out, hidden) + self.b_out
        return x @ self.W_U


def from_flax_params(config: GrokkingConfig, params) -> TorchTransformer:
    """A :class:`TorchTransformer` holding copies of the Flax params (same names and layouts)."""
    model = TorchTransformer(config)
    with torch.no_grad():
        for name in PARAM_NAMES:
            getattr(model, name).copy_(torch.from_numpy(np.array(params[name], dtype=np.float32)))
    return model
