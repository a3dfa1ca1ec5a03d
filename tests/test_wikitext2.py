"""The WikiText-2 experiment: data rules on hand-made examples, the model, and an offline run.

Nothing is downloaded: the end-to-end run trains the tiny config on files in the
raw WikiText format written to ``tmp_path`` and loaded with ``datasets``; every
step after ``load_dataset`` is the code the real data goes through.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ars2_jax
from experiments import common, wikitext2
from models.qwen3 import Qwen3, Qwen3Config

TINY = wikitext2.CONFIG_DIR / "tiny.toml"


class TableTokenizer:
    """A stand-in tokenizer whose encodings are given by a table."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def token_to_id(self, token: str) -> int:
        return {wikitext2.END_OF_TEXT: 0, wikitext2.PAD: 1}[token]

    def encode_batch(self, texts):
        return [type("Encoding", (), {"ids": self.table[text]}) for text in texts]


def test_sentence_splitting_on_a_hand_made_example():
    lines = [
        "",
        " = Valkyria Chronicles = \n",
        "",
        " The game began . It sold well.\n",
        " A\nB . . C \n",
        " \n",
    ]
    assert wikitext2.split_sentences(lines) == [
        "= Valkyria Chronicles =.",
        "The game began.",
        "It sold well.",
        "A B.",
        "C.",
    ]


def test_tokenized_pieces_get_an_end_of_text_and_a_length_filter():
    tokenizer = TableTokenizer({"a.": [], "b.": [5], "c.": [6, 6, 6, 6], "d.": [7] * 5})
    # With the end-of-text token: lengths 1 (dropped: 1 < length), 2, 5 (= context,
    # kept) and 6 (> context, dropped).
    pieces = wikitext2.tokenize_pieces(tokenizer, ["a.", "b.", "c.", "d."], context=5)
    assert pieces == [[5, 0], [6, 6, 6, 6, 0]]


def test_greedy_packing_longest_first_on_a_hand_made_example():
    pieces = [[1, 0], [2, 2, 2, 0], [3, 3, 3, 3, 0], [4, 0], [5, 5, 0]]
    packed = wikitext2.pack(pieces, context=6)
    # Sorted by length (ties in their order): 3333 (5), 222 (4), 55 (3), 1 (2), 4 (2);
    # each goes into the current sequence while it fits, else starts the next.
    assert packed == [[3, 3, 3, 3, 0], [2, 2, 2, 0], [5, 5, 0, 1, 0], [4, 0]]
    np.testing.assert_array_equal(
        wikitext2.to_array(packed, context=6, pad_id=9),
        [
            [3, 3, 3, 3, 0, 9],
            [2, 2, 2, 0, 9, 9],
            [5, 5, 0, 1, 0, 9],
            [4, 0, 9, 9, 9, 9],
        ],
    )
    with pytest.raises(ValueError, match="exceeds context=3"):
        wikitext2.pack([[1, 2, 3, 4]], context=3)


def test_local_files_load_as_written_and_the_tokenizer_is_cached(tmp_path):
    data = wikitext2.write_offline_sample(tmp_path / "sample", paragraphs=12)
    lines = wikitext2.load_splits(data)
    # The raw line structure survives the round trip through datasets.
    assert lines["train"] == wikitext2.sample_lines(12, seed=0)
    assert lines["validation"] == wikitext2.sample_lines(3, seed=1)
    assert any(line.startswith(" = ") and line.endswith(" = \n") for line in lines["train"])

    tokenizer, path = wikitext2.cached_tokenizer(lines["train"], 300, tmp_path / "cache")
    assert path.is_file() and path.parent == tmp_path / "cache"
    assert tokenizer.get_vocab_size() == 300
    assert tokenizer.token_to_id(wikitext2.END_OF_TEXT) is not None
    assert tokenizer.token_to_id(wikitext2.PAD) is not None
    text = "The ship crossed the coast."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: lossless
    stamp = path.stat().st_mtime_ns
    again, same_path = wikitext2.cached_tokenizer(lines["train"], 300, tmp_path / "cache")
    assert same_path == path and path.stat().st_mtime_ns == stamp  # read, not retrained
    assert again.encode(text).ids == tokenizer.encode(text).ids
    _, other = wikitext2.cached_tokenizer(lines["train"], 290, tmp_path / "cache")
    assert other != path


def test_offline_with_empty_caches_exits_with_one_clear_message(tmp_path, offline_command):
    done = offline_command("experiments.wikitext2", "--config", "adamw")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "Salesforce/wikitext (wikitext-2-raw-v1) could not be loaded" in done.stderr
    assert "--offline-sample" in done.stderr and str(tmp_path / "hf") in done.stderr
    missing = {"path": "parquet", "data_files": {"train": str(tmp_path / "no.parquet")}}
    with pytest.raises(common.DataUnavailable, match=r"no\.parquet"):
        wikitext2.load_splits(missing)


def test_tiny_config_offline_from_the_command_line(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    command = "--config tiny --offline-sample --quiet --cache-dir {} --out {}"
    wikitext2.main(command.format(cache, out).split())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = common.load_config(TINY)["train"]["epochs"]
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    for key in ("train_ppl", "val_ppl"):
        values = [row[key] for row in rows]
        assert all(math.isfinite(value) for value in values)
        assert all(later < earlier for earlier, later in itertools.pairwise(values)), (key, values)
    # Perplexity is exp of the mean token loss; the untrained model starts near the
    # vocabulary size (320) and the first epoch already learns.
    assert rows[0]["val_ppl"] == pytest.approx(math.exp(rows[0]["val_loss"]))
    assert rows[-1]["val_ppl"] < 0.5 * rows[0]["val_ppl"] < 320
    assert rows[-1]["sync_count"] >= 1  # A-GSAM syncs at least on step 1
    summary = (out / "summary.md").read_text()
    best = min(row["val_ppl"] for row in rows)
    assert f"best validation PPL {best:.2f}" in summary
    assert f"last {rows[-1]['val_ppl']:.2f}" in summary
    assert (out / "curves.png").stat().st_size > 0
    assert len(list(cache.glob("tokenizer-*.json"))) == 1
    assert sorted(os.listdir(cache / "offline-sample")) == [
        "hf",
        "train.parquet",
        "validation.parquet",
    ]


def test_model_is_causal_with_a_tied_embedding():
    config = Qwen3Config(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_mlp=32, max_len=8)
    model = Qwen3(config)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    assert "lm_head" not in params and params["embed"]["embedding"].shape == (50, 16)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, tokens)
    assert logits.shape == (2, 6, 50)
    changed = apply({"params": params}, tokens.at[:, -1].set(0))
    np.testing.assert_array_equal(logits[:, :-1], changed[:, :-1])
    assert not np.allclose(logits[:, -1], changed[:, -1])


def test_full_model_size_and_tracks():
    config = common.load_config(wikitext2.CONFIG_DIR / "ars2_neo_sync.toml")
    model = Qwen3(wikitext2.model_config(config, 40479))
    params = jax.eval_shape(lambda: wikitext2.init_params(model, 0))
    d, mlp, layers, head = 512, 2048, 3, 128
    per_layer = 4 * d * d + 3 * d * mlp + 2 * d + 2 * head
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == (
        40479 * d + layers * per_layer + d
    )
    labels = jax.tree_util.tree_leaves_with_path(ars2_jax.default_param_labels(params))
    for path, label in labels:
        name = jax.tree_util.keystr(path)
        expected = "ars2" if name.endswith("['kernel']") else "adamw"
        assert label == expected, name
    assert labels[0][1] == "adamw" and "embed" in jax.tree_util.keystr(labels[0][0])


def test_flop_count_adds_the_newton_schulz_iterations_xla_misses():
    """ARS2-Neo's NS runs in a fori_loop, whose body XLA counts once; optax's Muon unrolls
    its five iterations. With the correction both count the same matrix work."""
    params = {"w": jax.ShapeDtypeStruct((64, 256), jnp.float32)}

    def flops(tx):
        state = jax.eval_shape(tx.init, params)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p))
        return update.lower(params, state, params).cost_analysis()["flops"]

    ars2 = flops(ars2_jax.ars2_neo(1e-3, ns_dtype=jnp.float32))
    muon = flops(optax.contrib.muon(1e-3))
    iteration = 4 * 64 * 64 * 256 + 2 * 64**3
    assert common.newton_schulz_loop_flops(params, ns_steps=5) == 4 * iteration
    assert ars2 < 0.4 * muon  # one iteration counted instead of five
    assert ars2 + common.newton_schulz_loop_flops(params, 5) == pytest.approx(muon, rel=0.03)
