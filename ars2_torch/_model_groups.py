"""Param groups read from a model's ``torch.nn`` modules: tracks and per-head matrix views."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ars2_torch.optimizer import DEFAULT_MAX_DIM, is_ars2_tensor

# Modules whose weight is one matrix in the default view of SPEC §2: (out, in),
# or (out, in·kh·kw) for a convolution.
MATRIX_MODULES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
# Modules whose parameters are all tables or scales, never matrices of a map.
ADAMW_MODULES = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)


def _attention_layouts(module: nn.MultiheadAttention) -> dict[torch.Tensor, tuple[int, int]]:
    """``(row_blocks, column_blocks)`` of an attention module's projection weights.

    Per head, as SPEC §2 asks: the packed ``in_proj_weight`` ``(3·E, E)`` is
    ``3·heads`` matrices ``head_dim × E`` (Q, K and V apart, each head apart);
    separate ``q/k/v_proj_weight`` ``(E, d)`` are ``heads`` matrices
    ``head_dim × d``; ``out_proj.weight`` ``(E, heads·head_dim)`` is ``heads``
    matrices ``E × head_dim``.
    """
    heads = module.num_heads
    layouts = {module.out_proj.weight: (1, heads)}
    if module.in_proj_weight is not None:
        layouts[module.in_proj_weight] = (3 * heads, 1)
    for weight in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
        if weight is not None:
            layouts[weight] = (heads, 1)
    return layouts


def model_param_groups(model: nn.Module, max_dim: int = DEFAULT_MAX_DIM) -> list[dict[str, Any]]:
    """Param groups for :class:`~ars2_torch.ARS2Neo`, read from the modules that own each tensor.

    The track and the Newton-Schulz view of each parameter come from its module:

    * ``nn.Linear``, ``nn.Bilinear``, ``nn.Conv*d``, ``nn.ConvTranspose*d``: the
      weight is on the ARS2 track in the default view of SPEC §2 (``(out, in)``;
      ``(out, in·kh·kw)`` for a convolution), unless a dimension reaches
      ``max_dim``.
    * ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``,
      ``nn.TransformerDecoderLayer``, ``nn.Transformer``): per head. The packed
      ``in_proj_weight`` ``(3·E, E)`` is orthogonalized as ``3·heads`` matrices
      ``head_dim × E`` (``row_blocks = 3·heads``): Q, K and V are three maps
      that torch stores in one tensor, and SPEC §2 takes each head's
      ``input × head_dim`` projection as a matrix; orthogonalizing the packed
      ``(3·E, E)`` would couple the singular directions of Q, K and V and of
      the heads, which never mix in the forward pass. ``out_proj.weight`` is
      ``heads`` matrices ``E × head_dim`` (``column_blocks = heads``).
    * Biases of every module (``bias``, ``in_proj_bias``, ``bias_k``,
      ``bias_v``), embeddings (``nn.Embedding``, ``nn.EmbeddingBag``) and norms:
      the AdamW track.
    * Any other parameter (one registered on a custom module) follows the shape
      rule of SPEC §1 in the default view, with a warning when it is on the
      ARS2 track with 3 or more axes, whose layout its shape cannot tell.

    A tensor shared by two modules (tied embeddings) takes the layout of the
    first module that owns it in ``model.named_modules()`` order.

    Args:
      model: the module to optimize.
      max_dim: matrices with a dimension ``>= max_dim`` go to AdamW.

    Returns:
      Groups in ``named_parameters()`` form, so that each carries its
      ``param_names``: ``{'params': [(name, tensor), ...], 'ars2': True}`` for the
      default view, ``{'params': ..., 'ars2': True, 'row_blocks': r,
      'column_blocks': c}`` for each block view, and ``{'params': ...,
      'ars2': False}``; empty groups are left out. Add per-group keys (``lr``,
      ``weight_decay``) before handing them to :class:`~ars2_torch.ARS2Neo`.

    Example:
      >>> import torch
      >>> from ars2_torch import ARS2Neo, model_param_groups
      >>> layer = torch.nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32)
      >>> groups = model_param_groups(layer)
      >>> [(len(g["params"]), g["ars2"], g.get("row_blocks", 1), g.get("column_blocks", 1))
      ...  for g in groups]
      [(2, True, 1, 1), (1, True, 1, 2), (1, True, 6, 1), (8, False, 1, 1)]
      >>> opt = ARS2Neo(groups, lr=1e-3)
      >>> opt.param_groups[2]["param_names"]
      ['self_attn.in_proj_weight']
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={model!r} must be a torch.nn.Module")
    owner: dict[torch.Tensor, tuple[nn.Module, str]] = {}
    blocks: dict[torch.Tensor, tuple[int, int]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            owner.setdefault(param, (module, name))
        if isinstance(module, nn.MultiheadAttention):
            for param, layout in _attention_layouts(module).items():
                blocks.setdefault(param, layout)

    groups: dict[tuple[bool, int, int], list[tuple[str, torch.Tensor]]] = {}
    for full_name, param in model.named_parameters():
        module, name = owner[param]
        fits = is_ars2_tensor(param, max_dim)
        if param in blocks:
            key = (True, *blocks[param]) if fits else (False, 1, 1)
        elif "bias" in name or isinstance(module, ADAMW_MODULES):
            key = (False, 1, 1)
        else:
            key = (fits, 1, 1)
            known = isinstance(module, (*MATRIX_MODULES, nn.MultiheadAttention))
            if fits and param.ndim >= 3 and not known:
                warnings.warn(
                    f"{full_name} of shape {tuple(param.shape)} belongs to a "
                    f"{type(module).__name__}, whose layout ars2_torch does not know: it is "
                    "orthogonalized in the default view of SPEC §2 (3-D: a batch over axis 0; "
                    "4-D and up: (out, rest)); put it in a group of its own if that is not "
                    "its layout",
                    stacklevel=2,
                )
        groups.setdefault(key, []).append((full_name, param))

    order = sorted(groups, key=lambda key: (not key[0], key[1], key[2]))
    result = []
    for ars2, row_blocks, column_blocks in order:
        group: dict[str, Any] = {"params": groups[(ars2, row_blocks, column_blocks)], "ars2": ars2}
        if (row_blocks, column_blocks) != (1, 1):
            group.update(row_blocks=row_blocks, column_blocks=column_blocks)
        result.append(group)
    return result
