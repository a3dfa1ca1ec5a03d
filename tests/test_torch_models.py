"""ARS2Neo on models built from torch.nn modules: per-head views, training, schedulers, copies."""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from torch import nn

from ars2_torch import (
    ARS2Neo,
    ars2_update,
    as_matrices,
    model_param_groups,
    newton_schulz,
    sam_closure,
)

VOCAB, WIDTH, HEADS, FEEDFORWARD, LENGTH, BATCH = 32, 16, 2, 32, 8, 8


class LanguageModel(nn.Module):
    """A 2-layer transformer LM from torch.nn modules only."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH, HEADS, FEEDFORWARD, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.norm(self.encoder(self.embed(tokens), mask=mask, is_causal=True)))


@pytest.fixture(autouse=True)
def _keep_the_global_random_state():
    # These tests seed torch; the tests that run after them draw unseeded data.
    with torch.random.fork_rng():
        yield


def _layer_table(prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    head_dim = WIDTH // HEADS
    return {
        f"{prefix}.self_attn.in_proj_weight": ("ars2", (3 * HEADS, head_dim, WIDTH)),
        f"{prefix}.self_attn.in_proj_bias": ("adamw", ()),
        f"{prefix}.self_attn.out_proj.weight": ("ars2", (HEADS, WIDTH, head_dim)),
        f"{prefix}.self_attn.out_proj.bias": ("adamw", ()),
        f"{prefix}.linear1.weight": ("ars2", (1, FEEDFORWARD, WIDTH)),
        f"{prefix}.linear1.bias": ("adamw", ()),
        f"{prefix}.linear2.weight": ("ars2", (1, WIDTH, FEEDFORWARD)),
        f"{prefix}.linear2.bias": ("adamw", ()),
        f"{prefix}.norm1.weight": ("adamw", ()),
        f"{prefix}.norm1.bias": ("adamw", ()),
        f"{prefix}.norm2.weight": ("adamw", ()),
        f"{prefix}.norm2.bias": ("adamw", ()),
    }


# Written by hand: the track of every parameter and the batch of matrices
# Newton-Schulz sees for each ARS2 one (per head for attention, SPEC §2).
EXPECTED_VIEWS = {
    "embed.weight": ("adamw", ()),
    **_layer_table("encoder.layers.0"),
    **_layer_table("encoder.layers.1"),
    "norm.weight": ("adamw", ()),
    "norm.bias": ("adamw", ()),
    "head.weight": ("ars2", (1, VOCAB, WIDTH)),
    "head.bias": ("adamw", ()),
}


def _views(groups) -> dict[str, tuple[str, tuple[int, ...]]]:
    views = {}
    for group in groups:
        blocks = group.get("row_blocks", 1), group.get("column_blocks", 1)
        for name, param in group["params"]:
            views[name] = (
                ("ars2", tuple(as_matrices(param, *blocks).shape))
                if group["ars2"]
                else ("adamw", ())
            )
    return views


def test_views_of_a_transformer_lm_follow_the_table():
    model = LanguageModel()
    groups = model_param_groups(model)
    assert _views(groups) == EXPECTED_VIEWS
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_attention_with_separate_projections_and_kv_biases():
    attention = nn.MultiheadAttention(12, 3, kdim=6, vdim=9, add_bias_kv=True)
    assert _views(model_param_groups(attention)) == {
        "q_proj_weight": ("ars2", (3, 4, 12)),
        "k_proj_weight": ("ars2", (3, 4, 6)),
        "v_proj_weight": ("ars2", (3, 4, 9)),
        "in_proj_bias": ("adamw", ()),
        "bias_k": ("adamw", ()),
        "bias_v": ("adamw", ()),
        "out_proj.weight": ("ars2", (3, 12, 4)),
        "out_proj.bias": ("adamw", ()),
    }


def test_every_attention_of_a_full_transformer_is_viewed_per_head():
    model = nn.Transformer(WIDTH, HEADS, 1, 1, FEEDFORWARD, batch_first=True)
    views = _views(model_param_groups(model))
    attention = [name for name in views if name.endswith("in_proj_weight")]
    assert sorted(attention) == [
        "decoder.layers.0.multihead_attn.in_proj_weight",
        "decoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.in_proj_weight",
    ]
    head_dim = WIDTH // HEADS
    for name in attention:
        assert views[name] == ("ars2", (3 * HEADS, head_dim, WIDTH))
        out = name.replace("in_proj_weight", "out_proj.weight")
        assert views[out] == ("ars2", (HEADS, WIDTH, head_dim))


def test_a_tied_embedding_stays_on_adamw_once():
    model = nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB, bias=False))
    model[1].weight = model[0].weight
    groups = model_param_groups(model)
    assert [(g["ars2"], [n for n, _ in g["params"]]) for g in groups] == [(False, ["0.weight"])]


def test_conv_and_large_embeddings_and_unknown_layouts():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.zeros(2, 3, 4))
            self.matrix = nn.Parameter(torch.zeros(3, 4))

    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 8, 3),
            "head": nn.Linear(4, 20000, bias=False),
            "custom": Custom(),
        }
    )
    with pytest.warns(UserWarning, match=r"custom.kernel of shape \(2, 3, 4\) belongs to a Custom"):
        views = _views(model_param_groups(model))
    assert views == {
        "conv.weight": ("ars2", (1, 8, 27)),
        "conv.bias": ("adamw", ()),
        "head.weight": ("adamw", ()),
        "custom.kernel": ("ars2", (2, 3, 4)),
        "custom.matrix": ("ars2", (1, 3, 4)),
    }


def test_block_views_orthogonalize_each_block_apart_and_keep_the_whole_energy():
    torch.manual_seed(0)
    packed = torch.randn(3 * WIDTH, WIDTH, dtype=torch.float64)
    blocks = newton_schulz(packed, row_blocks=3 * HEADS)
    head_dim = WIDTH // HEADS
    for index, block in enumerate(packed.split(head_dim)):
        expected = newton_schulz(block)
        assert torch.equal(blocks[index * head_dim : (index + 1) * head_dim], expected)
    out = torch.randn(WIDTH, WIDTH, dtype=torch.float64)
    columns = newton_schulz(out, column_blocks=HEADS)
    for index, block in enumerate(out.split(head_dim, dim=1)):
        assert torch.equal(
            columns[:, index * head_dim : (index + 1) * head_dim], newton_schulz(block)
        )

    # One ARS2 step: θ ← θ − lr·‖u‖·NS_blocks(u), with ‖u‖ the norm of the whole tensor.
    param, grad = torch.zeros_like(packed), torch.randn_like(packed)
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 0.1, "weight_decay": 0.0}
    group.update(ns_steps=5, ns_dtype=None, row_blocks=3 * HEADS, column_blocks=1)
    state = {"step": 0, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    ars2_update(param, grad, state, group)
    u = grad / (grad.abs() + 1e-8)
    expected = -0.1 * torch.linalg.vector_norm(u) * newton_schulz(u, row_blocks=3 * HEADS)
    torch.testing.assert_close(param, expected, rtol=1e-12, atol=0)


def test_block_views_are_validated():
    weight, vector = nn.Parameter(torch.zeros(6, 4)), nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="row_blocks=4, column_blocks=1 need a 2-D tensor"):
        ARS2Neo([{"params": [weight], "ars2": True, "row_blocks": 4}])
    with pytest.raises(ValueError, match="block views are for ars2=True groups"):
        ARS2Neo([{"params": [weight, vector], "row_blocks": 2}])
    with pytest.raises(ValueError, match="column_blocks=0 must be an integer >= 1"):
        ARS2Neo([{"params": [weight], "ars2": True, "column_blocks": 0}])
    with pytest.raises(ValueError, match="model="):
        model_param_groups([weight])


def _tokens():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=generator)


def _closure(model, tokens):
    def closure():
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss

    return closure


def _run(model, opt, scheduler, steps, use_sam_closure):
    tokens, losses = _tokens(), []
    for _ in range(steps):
        closure = _closure(model, tokens)
        opt.zero_grad()
        loss = opt.step(sam_closure(model, closure) if use_sam_closure else closure)
        scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "name", ["adamw", "ars2_base", "ars2_sync", "ars2_delayed", "ars2_adaptive"]
)
def test_transformer_lm_trains_with_a_scheduler_hooks_and_a_deepcopy_midway(name):
    torch.manual_seed(0)
    model = LanguageModel()
    sam = {
        "ars2_base": {},
        "ars2_sync": {"rho": 0.05, "k": 1},
        "ars2_delayed": {"rho": 0.05, "k": 3},
        "ars2_adaptive": {"rho": 0.05, "k": 4, "adaptive": True},
    }
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        opt = ARS2Neo(model_param_groups(model), lr=1e-2, **sam[name])
    steps_seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: steps_seen.append(True))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
    use_sam_closure = name in ("ars2_sync", "ars2_delayed", "ars2_adaptive")

    losses = _run(model, opt, scheduler, 10, use_sam_closure)
    copied, rng = copy.deepcopy((model, opt, scheduler)), torch.get_rng_state()
    losses += _run(model, opt, scheduler, 10, use_sam_closure)
    torch.set_rng_state(rng)  # the same dropout masks
    copied_losses = _run(*copied, 10, use_sam_closure)

    assert losses[-1] <= 0.5 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert copied_losses == losses[10:]
    for original, twin in zip(model.parameters(), copied[0].parameters()):
        assert torch.equal(original, twin)
    assert len(steps_seen) == 20
    assert opt.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("name", ["ars2_sync", "ars2_adaptive"])
def test_transformer_lm_checkpoint_round_trip_continues_bitwise(name):
    sam = {
        "ars2_sync": {"rho": 0.05, "k": 1},
        "ars2_adaptive": {"rho": 0.05, "k": 4, "adaptive": True},
    }

    def build():
        model = LanguageModel()
        opt = ARS2Neo(model_param_groups(model), lr=1e-2, **sam[name])
        return (
            model,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4)),
        )

    torch.manual_seed(0)
    model, opt, scheduler = build()
    _run(model, opt, scheduler, 10, True)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buffer,
    )
    expected = _run(model, opt, scheduler, 10, True)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed, resumed_opt, resumed_scheduler = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    assert _run(resumed, resumed_opt, resumed_scheduler, 10, True) == expected
    for original, twin in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, twin)
    assert resumed_opt.diagnostics == opt.diagnostics


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, from torch.nn modules."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(width: int = 64, classes: int = 10) -> nn.Module:
    """ResNet-18 as torchvision lays it out (7×7 stem, max pool, four stages of two blocks)."""
    stages, inputs = [], width
    for index, outputs in enumerate([width, 2 * width, 4 * width, 8 * width]):
        stride = 1 if index == 0 else 2
        stages.append(
            nn.Sequential(BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1))
        )
        inputs = outputs
    return nn.Sequential(
        collections.OrderedDict(
            conv1=nn.Conv2d(3, width, 7, 2, 3, bias=False),
            bn1=nn.BatchNorm2d(width),
            relu=nn.ReLU(),
            maxpool=nn.MaxPool2d(3, 2, 1),
            layer1=stages[0],
            layer2=stages[1],
            layer3=stages[2],
            layer4=stages[3],
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(8 * width, classes),
        )
    )


def _resnet_table(width: int, classes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    # Convolutions are (out, in·kh·kw) matrices (SPEC §2), batch norms on AdamW.
    table = {"conv1.weight": ("ars2", (1, width, 3 * 7 * 7))}
    table.update({"bn1.weight": ("adamw", ()), "bn1.bias": ("adamw", ())})
    inputs = width
    for stage, outputs in enumerate([width, 2 * width, 4 * width, 8 * width], start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            block_inputs = inputs if block == 0 else outputs
            table[f"{prefix}.conv1.weight"] = ("ars2", (1, outputs, block_inputs * 9))
            table[f"{prefix}.conv2.weight"] = ("ars2", (1, outputs, outputs * 9))
            for norm in ("bn1", "bn2"):
                table[f"{prefix}.{norm}.weight"] = ("adamw", ())
                table[f"{prefix}.{norm}.bias"] = ("adamw", ())
            if block == 0 and stage > 1:
                table[f"{prefix}.downsample.0.weight"] = ("ars2", (1, outputs, inputs))
                table[f"{prefix}.downsample.1.weight"] = ("adamw", ())
                table[f"{prefix}.downsample.1.bias"] = ("adamw", ())
        inputs = outputs
    table["fc.weight"] = ("ars2", (1, classes, 8 * width))
    table["fc.bias"] = ("adamw", ())
    return table


@pytest.mark.parametrize("width", [16, 64])
def test_resnet18_views_follow_the_table(width):
    model = resnet18(width)
    assert _views(model_param_groups(model)) == _resnet_table(width, 10)


@pytest.mark.parametrize("name", ["adamw", "ars2_base", "ars2_sync"])
def test_small_resnet18_with_batch_norm_trains(name):
    torch.manual_seed(0)
    model = resnet18(16)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=generator), torch.arange(16) % 10
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        sam = {"rho": 0.05, "k": 1} if name == "ars2_sync" else {}
        opt = ARS2Neo(model_param_groups(model), lr=1e-2, **sam)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(20):
        opt.zero_grad()
        losses.append(opt.step(sam_closure(model, closure)).item())
    assert losses[-1] <= 0.5 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(model.bn1.num_batches_tracked) == 20  # one count per step, SAM or not


def test_full_width_resnet18_takes_base_steps():
    torch.manual_seed(0)
    model = resnet18(64)
    opt = ARS2Neo(model_param_groups(model), lr=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    before = model.fc.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.fc.weight, before) and opt.sam_state["step"] == 2
