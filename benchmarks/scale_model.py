"""On paper: ARS2-Neo's Newton-Schulz time per step at scale, three ways.

    python -m benchmarks.scale_model    # the markdown table of docs/sharded_newton_schulz.md

For GPT-2-small (12 blocks, d_model 768) and a 1.3B GPT (24 blocks, d_model 2048, MLP
8192) on 8 and 64 devices, the optimizer's Newton-Schulz time per step is modelled as
``FLOPs per device / peak + bytes received per device / bandwidth`` (no overlap of the
two), with:

* FLOPs from :func:`ars2_jax.newton_schulz_flops` (5 steps), at an H100's dense bfloat16
  peak, ``PEAK_FLOPS`` (an upper bound on speed: real Newton-Schulz matmuls reach less);
* bytes at ``NVLINK`` within a node of 8 and at 400 Gb/s InfiniBand, ``INFINIBAND``, per
  device, across nodes (the 64-device rows);
* the three ways:

  - **replicated**: every device orthogonalizes every matrix, nothing moves;
  - **XLA FSDP**: today's lowering of the sharded update, per device
    ``TODAY_SHARES_PER_DEVICE`` × the matrices' float32 bytes (measured by
    ``python -m benchmarks.sharding`` on 4 and on 8 forced devices: 35 and 70 shares,
    i.e. 8.75 × the matrices' bytes whatever the device count; assumed to hold at 64),
    and the total FLOPs / N × ``TODAY_FLOPS_RATIO`` (measured 1.25 on 8 devices);
  - **owners** (``ns_sharding``, FSDP): FLOPs of the busiest owner after
    :func:`ars2_jax.assign_owners`; bytes of the two all-to-alls of bfloat16 blocks,
    ``2 · N · C · 2`` with ``C`` the largest owner's share of blocks (elements) per
    device, as the implementation pads them.

The gradient's own all-reduce or reduce-scatter, the forward and backward passes and the
optimizer's elementwise work are the same for every way and left out. The state: float32
params, Adam moments and updates, split over the devices under FSDP.
"""

from __future__ import annotations

import math

import ars2_jax

PEAK_FLOPS = 989e12  # H100 SXM, dense bfloat16 (NVIDIA's datasheet)
NVLINK = 450e9  # bytes/s per GPU, one direction (NVLink 4: 900 GB/s bidirectional)
INFINIBAND = 50e9  # bytes/s per GPU: 400 Gb/s NDR
NS_STEPS = 5
TODAY_SHARES_PER_DEVICE = 8.75  # XLA FSDP bytes per device / matrices' float32 bytes
TODAY_FLOPS_RATIO = 1.25
DEVICE_COUNTS = (8, 64)


def gpt_matrices(blocks: int, d_model: int, d_mlp: int) -> list[tuple[int, int]]:
    per_block = [(d_model, 3 * d_model), (d_model, d_model), (d_model, d_mlp), (d_mlp, d_model)]
    return per_block * blocks


MODELS = {
    "GPT-2-small (12 × 768)": gpt_matrices(12, 768, 3072),
    "GPT 1.3B (24 × 2048, MLP 8192)": gpt_matrices(24, 2048, 8192),
}


def owner_costs(shapes: list[tuple[int, int]], n: int) -> tuple[int, int]:
    """The busiest owner's FLOPs and the padded block count ``C`` per device."""
    owners = ars2_jax.assign_owners(shapes, n)
    flops = [0] * n
    elements = [0] * n
    for shape, owner in zip(shapes, owners):
        flops[owner] += ars2_jax.newton_schulz_flops(shape, NS_STEPS)
        elements[owner] += math.prod(shape) // n
    return max(flops), max(elements)


def rows() -> list[dict]:
    out = []
    for model, shapes in MODELS.items():
        total_flops = sum(ars2_jax.newton_schulz_flops(s, NS_STEPS) for s in shapes)
        matrix_bytes = 4 * sum(math.prod(s) for s in shapes)
        for n in DEVICE_COUNTS:
            bandwidth = NVLINK if n <= 8 else INFINIBAND
            busiest, chunk = owner_costs(shapes, n)
            ways = {
                "replicated": (total_flops, 0),
                "XLA FSDP": (
                    total_flops / n * TODAY_FLOPS_RATIO,
                    TODAY_SHARES_PER_DEVICE * matrix_bytes,
                ),
                "owners (ns_sharding)": (busiest, 2 * n * chunk * 2),
            }
            for way, (flops, moved) in ways.items():
                compute, comm = flops / PEAK_FLOPS, moved / bandwidth
                out.append(
                    dict(
                        model=model,
                        devices=n,
                        way=way,
                        link="NVLink" if n <= 8 else "InfiniBand",
                        flops_ratio=flops / (total_flops / n),
                        bytes=moved,
                        compute_ms=1e3 * compute,
                        comm_ms=1e3 * comm,
                        total_ms=1e3 * (compute + comm),
                    )
                )
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        "| model | devices (link) | Newton-Schulz | FLOPs / (total/N) | MiB received "
        "per device | compute ms | communication ms | total ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['model']} | {r['devices']} ({r['link']}) | {r['way']} | "
            f"{r['flops_ratio']:.2f} | {r['bytes'] / 2**20:.0f} | {r['compute_ms']:.2f} | "
            f"{r['comm_ms']:.2f} | {r['total_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    print(markdown(rows()), end="")


if __name__ == "__main__":
    main()
