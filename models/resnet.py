"""ResNet-18 for 32×32 inputs (the CIFAR-10 experiment, SPEC §7), in Flax.

The CIFAR variant of He et al.'s ResNet: a 3×3 stride-1 stem convolution and no
max-pool, then four stages of two basic blocks (64, 128, 256, 512 channels, the
last three starting with stride 2), global average pooling and a linear
classifier. Convolutions have no bias (a BatchNorm follows each); the shortcut is
a 1×1 convolution with BatchNorm where the shape changes.

BatchNorm keeps PyTorch's defaults (running averages updated with weight 0.1,
``eps`` 1e-5): Flax's ``momentum`` is the weight of the old value, 0.9. Running
statistics live in the ``batch_stats`` collection: call with ``train=True`` and
``mutable=['batch_stats']`` to normalize with the batch's statistics and get the
updated running averages; with ``train=False`` the running averages are used.

Layouts: conv kernels ``(kh, kw, in, out)`` and the classifier kernel
``(512, classes)`` go to the ARS2 track by the default rule (SPEC §2 views them as
``(kh·kw·in, out)`` and one matrix); BatchNorm scales and biases and the
classifier bias (1-D) go to the AdamW track.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_classes: int = 10

    def __post_init__(self):
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(
                f"stage_sizes={self.stage_sizes} and widths={self.widths} must be non-empty "
                "and of the same length"
            )


_conv = functools.partial(
    nn.Conv, use_bias=False, kernel_init=nn.initializers.kaiming_normal(), padding="SAME"
)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    # PyTorch's defaults: the running averages take 0.1 of each new batch, eps 1e-5.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = _conv(self.features, (3, 3), strides=self.stride, name="conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = _conv(self.features, (3, 3), name="conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, (1, 1), strides=self.stride, name="shortcut_conv")(x)
            x = _batch_norm(train, "shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Images ``(batch, 32, 32, 3)`` (normalized float) → logits ``(batch, num_classes)``."""

    config: ResNetConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        x = _conv(c.widths[0], (3, 3), name="stem_conv")(images)
        x = nn.relu(_batch_norm(train, "stem_bn")(x))
        for stage, (blocks, width) in enumerate(zip(c.stage_sizes, c.widths)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, stride, name=f"stage{stage + 1}_block{block + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(c.num_classes, name="classifier")(x)
