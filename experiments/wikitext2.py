"""WikiText-2 language modelling (SPEC §7): ARS2-Neo against AdamW and Muon on a Qwen3 decoder.

    python -m experiments.wikitext2 --config tiny --offline-sample   # seconds on a CPU, no download
    python -m experiments.wikitext2 --config ars2_neo_sync
    python -m experiments.wikitext2 --compare                         # the five runs of SPEC §7
    python -m experiments.wikitext2 --config ars2_neo_sync --estimate # parameters, FLOPs, time

Data, as the seed prepares it (SPEC §7):

1. ``datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")`` (the hub's
   name for ``"wikitext"``), or any other ``load_dataset`` call the config's
   ``[data]`` table describes (``path``, ``name``, ``data_files``): local files in
   the same format (a ``text`` column, one raw line per row) go through exactly
   the same code from here on. ``--offline-sample`` writes such files (a small
   synthetic text in WikiText's line structure) and trains on them.
2. A byte-level BPE tokenizer (``tokenizers``) of ``vocab_size`` tokens, special
   tokens ``<|endoftext|>`` and ``<pad>``, trained on the train split's lines and
   cached as ``<cache dir>/tokenizer-<hash>.json`` (the hash covers the text and
   the settings, so a changed corpus or vocabulary trains a new one).
3. :func:`split_sentences`: each line's newlines become spaces, the line is split
   on ``"."``, and every stripped, non-empty piece gets its ``"."`` back.
4. :func:`tokenize_pieces`: each piece is encoded, an end-of-text token appended,
   and kept when ``1 < length <= context`` (255).
5. :func:`pack`: the pieces, sorted longest first, are packed greedily into
   sequences of at most ``context`` tokens, padded with ``<pad>``.

Training: next-token cross-entropy over the non-pad targets of each packed
sequence (inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]``, plain causal
attention across the packed pieces), batches of 8 sequences reshuffled every
epoch (the last batch padded with empty sequences), one jitted step (loss,
gradient, ARS2-Neo's adversarial gradient when it syncs, update). Every epoch
ends with the validation perplexity ``exp(mean NLL per target token)``; the
report gives the best and the last.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

if __package__ in (None, ""):  # `python experiments/wikitext2.py`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ars2_jax
from experiments import common
from models.qwen3 import Qwen3, Qwen3Config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "wikitext2"
RESULTS = ROOT / "results" / "wikitext2"
DEFAULT_COMPARE = ("adamw", "muon", "ars2_neo_base", "ars2_neo_sync", "ars2_neo_agsam")
END_OF_TEXT = "<|endoftext|>"
PAD = "<pad>"
# Bump when the tokenizer recipe changes, so that cached tokenizers are retrained.
TOKENIZER_RECIPE = "byte-level-bpe-v1"
DIAGNOSTICS = ("phi", "phi_std", "threshold", "alpha_t", "sync_count", "effective_k")
# The seed's published best / last validation perplexities (SPEC §7).
PUBLISHED = {
    "adamw": (116.46, 213.52),
    "muon": (111.35, 475.65),
    "ars2_neo_base": (96.10, 3055.47),
    "ars2_neo_sync": (90.69, 330.85),
    "ars2_neo_agsam": (93.23, 414.83),
}
MILESTONES: list[common.Milestone] = [
    ("ppl_200", "val PPL < 200", lambda r: r["val_ppl"] < 200),
    ("ppl_120", "val PPL < 120", lambda r: r["val_ppl"] < 120),
    ("ppl_100", "val PPL < 100", lambda r: r["val_ppl"] < 100),
    ("ppl_95", "val PPL < 95", lambda r: r["val_ppl"] < 95),
]
CURVES = (("train_loss", "train loss (nats/token)"), ("val_loss", "validation loss (nats/token)"))


# --- data -------------------------------------------------------------------------------


NO_DATA_HINT = (
    'Give local files in the config\'s [data] table (path = "parquet" or "text", '
    'data_files = {train = "...", validation = "..."}), or run without data: '
    "--config tiny --offline-sample."
)


def load_splits(data: dict[str, Any]) -> dict[str, list[str]]:
    """The raw lines of the train and validation splits, through ``datasets.load_dataset``.

    Args:
      data: the config's ``[data]`` table: ``path`` (default
        ``"Salesforce/wikitext"``), ``name`` (default ``"wikitext-2-raw-v1"`` when
        ``path`` is the default, else none), ``data_files`` (e.g. ``{train = "...",
        validation = "..."}`` with ``path = "parquet"``) and ``cache_dir``.
    """

    path = data.get("path", "Salesforce/wikitext")
    name = data.get("name", "wikitext-2-raw-v1" if path == "Salesforce/wikitext" else None)
    loaded = common.load_hub_dataset(
        path,
        name,
        data_files=data.get("data_files"),
        cache_dir=data.get("cache_dir"),
        hint=NO_DATA_HINT,
    )
    missing = {"train", "validation"} - set(loaded)
    if missing:
        raise ValueError(f"data={data!r} gives no {sorted(missing)} split (has {sorted(loaded)})")
    return {split: list(loaded[split]["text"]) for split in ("train", "validation")}


def split_sentences(lines: Iterable[str]) -> list[str]:
    """Sentence pieces: lines split on ``"."``, each stripped non-empty piece with its ``"."``.

    A line's newlines become spaces first.

    Example:
      >>> split_sentences([" = Title = \\n", "", " A b . C d.\\n"])
      ['= Title =.', 'A b.', 'C d.']
    """
    pieces = []
    for line in lines:
        for piece in line.replace("\n", " ").split("."):
            piece = piece.strip()
            if piece:
                pieces.append(piece + ".")
    return pieces


def tokenize_pieces(tokenizer, pieces: Sequence[str], context: int) -> list[list[int]]:
    """Token ids of each piece plus the end-of-text token, kept when ``1 < length <= context``."""
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    encoded = tokenizer.encode_batch(list(pieces))
    sequences = [[*item.ids, end_of_text] for item in encoded]
    return [ids for ids in sequences if 1 < len(ids) <= context]


def pack(pieces: Sequence[Sequence[int]], context: int) -> list[list[int]]:
    """Greedy packing, longest pieces first, into sequences of at most ``context`` tokens.

    The pieces are sorted by length, longest first (ties keep their order); each
    is appended to the current sequence while it fits, otherwise it starts the
    next one.

    Example:
      >>> pack([[1], [2, 2, 2], [3, 3], [4, 4]], context=5)
      [[2, 2, 2, 3, 3], [4, 4, 1]]
    """
    ordered = sorted(pieces, key=len, reverse=True)
    if ordered and len(ordered[0]) > context:
        raise ValueError(f"a piece of {len(ordered[0])} tokens exceeds context={context}")
    sequences: list[list[int]] = []
    current: list[int] = []
    for piece in ordered:
        if current and len(current) + len(piece) > context:
            sequences.append(current)
            current = []
        current.extend(piece)
    if current:
        sequences.append(current)
    return sequences


def to_array(sequences: Sequence[Sequence[int]], context: int, pad_id: int) -> np.ndarray:
    """``(len(sequences), context)`` int32 token ids, each row padded with ``pad_id``."""
    array = np.full((len(sequences), context), pad_id, np.int32)
    for row, ids in zip(array, sequences):
        row[: len(ids)] = ids
    return array


def train_tokenizer(lines: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``lines``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def cached_tokenizer(lines: Sequence[str], vocab_size: int, cache_dir: str | pathlib.Path):
    """:func:`train_tokenizer`, or the one already saved for the same text and settings.

    Returns:
      ``(tokenizer, path)``: the tokenizer and its JSON file under ``cache_dir``.
    """
    from tokenizers import Tokenizer

    digest = hashlib.sha256()
    digest.update(f"{TOKENIZER_RECIPE}|{vocab_size}|{END_OF_TEXT}|{PAD}|".encode())
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\0")
    path = pathlib.Path(cache_dir) / f"tokenizer-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path)), path
    tokenizer = train_tokenizer(lines, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    tokenizer.save(str(partial))
    partial.replace(path)  # atomic: a concurrent run never reads half a file
    return tokenizer, path


@dataclasses.dataclass(frozen=True)
class Data:
    """Packed token ids of both splits, ``(sequences, context)`` int32, and the vocabulary."""

    train: np.ndarray
    validation: np.ndarray
    vocab_size: int
    pad_id: int
    tokenizer_path: pathlib.Path


def prepare_data(
    lines: dict[str, Sequence[str]], config: dict[str, Any], cache_dir: str | pathlib.Path
) -> Data:
    """Tokenizer (trained on the train lines, cached), sentence pieces, packing, for both splits."""
    data = config.get("data", {})
    context = data.get("context", 255)
    tokenizer, path = cached_tokenizer(
        lines["train"], config.get("tokenizer", {}).get("vocab_size", 40479), cache_dir
    )
    pad_id = tokenizer.token_to_id(PAD)
    arrays = {
        split: to_array(
            pack(tokenize_pieces(tokenizer, split_sentences(lines[split]), context), context),
            context,
            pad_id,
        )
        for split in ("train", "validation")
    }
    return Data(arrays["train"], arrays["validation"], tokenizer.get_vocab_size(), pad_id, path)


# The offline sample: a small synthetic text with WikiText's raw line structure.
_SUBJECTS = ("the ship", "the army", "the king", "a river", "the city", "the song", "a storm")
_VERBS = ("reached", "crossed", "praised", "built", "left", "followed", "named")
_OBJECTS = ("the coast", "the old bridge", "a new temple", "the northern hills", "the album")
_TAILS = ("in 1846", "after the war", "with great care", "for many years", ", as planned")


def sample_lines(paragraphs: int, seed: int) -> list[str]:
    """Raw WikiText-style rows: ``" = Title = \\n"`` headings, blank rows, paragraphs."""
    rng = np.random.default_rng(seed)
    lines = [""]
    for index in range(paragraphs):
        if index % 3 == 0:
            level = "= " * (1 + index % 2)
            lines += [f" {level}Section {index // 3} {level.strip()} \n", ""]
        sentences = []
        for _ in range(int(rng.integers(2, 6))):
            words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
            if rng.random() < 0.5:
                words.append(rng.choice(_TAILS))
            sentences.append(" ".join(words).capitalize() + " .")
        lines += [" " + " ".join(sentences) + " \n", ""]
    return lines


def write_offline_sample(directory: str | pathlib.Path, paragraphs: int = 60) -> dict[str, Any]:
    """Writes train / validation parquet files of :func:`sample_lines`; returns their ``[data]``."""
    import datasets

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed, split in enumerate(("train", "validation")):
        files[split] = str(directory / f"{split}.parquet")
        count = paragraphs if split == "train" else max(1, paragraphs // 4)
        datasets.Dataset.from_dict({"text": sample_lines(count, seed)}).to_parquet(files[split])
    return {"path": "parquet", "data_files": files, "cache_dir": str(directory / "hf")}


# --- model and steps --------------------------------------------------------------------


def model_config(config: dict[str, Any], vocab_size: int) -> Qwen3Config:
    context = config.get("data", {}).get("context", 255)
    return Qwen3Config(vocab_size=vocab_size, max_len=context, **config.get("model", {}))


def muon_dimension_numbers(params) -> Any:
    """Muon on every projection kernel ``(in, out)``; Adam (``None``) on the embedding and norms."""
    matrix = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: matrix if getattr(path[-1], "key", None) == "kernel" else None, params
    )


def init_params(model: Qwen3, seed: int):
    dummy = jnp.zeros((1, model.config.max_len - 1), jnp.int32)
    # Jitted: one compilation instead of one per initializer op.
    return jax.jit(model.init)(jax.random.key(seed), dummy)["params"]


def token_losses(model: Qwen3, params, tokens: jax.Array, pad_id: int):
    """Mean next-token NLL over the non-pad targets, and ``(NLL sum, target count)``."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model.apply({"params": params}, inputs).astype(jnp.float32)
    mask = (targets != pad_id).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    total, count = jnp.sum(nll * mask), jnp.sum(mask)
    return total / jnp.maximum(count, 1.0), (total, count)


def make_train_step(model: Qwen3, tx, pad_id: int):
    """``(params, opt_state, tokens) -> (params, opt_state, (NLL sum, count))``, jitted."""

    def train_step(params, opt_state, tokens):
        loss_fn = lambda p: token_losses(model, p, tokens, pad_id)
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(p)[0]
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state, sums

    return jax.jit(train_step, donate_argnums=(0, 1))


def make_evaluate_batch(model: Qwen3, pad_id: int):
    """``(params, tokens) -> (NLL sum, count)``, jitted."""
    return jax.jit(lambda params, tokens: token_losses(model, params, tokens, pad_id)[1])


def batch_indices(count: int, batch_size: int, rng: np.random.Generator | None) -> np.ndarray:
    """``(batches, batch_size)`` row indices, shuffled by ``rng`` (``None``: in order).

    The last batch is padded with the index ``count``, an all-pad row.
    """
    order = np.arange(count) if rng is None else rng.permutation(count)
    padding = -count % batch_size
    return np.concatenate([order, np.full(padding, count)]).reshape(-1, batch_size)


def with_pad_row(tokens: np.ndarray, pad_id: int) -> np.ndarray:
    return np.concatenate([tokens, np.full((1, tokens.shape[1]), pad_id, tokens.dtype)])


# --- one run ----------------------------------------------------------------------------


@dataclasses.dataclass
class RunSettings:
    """What a command line may override in a config."""

    seed: int = 0
    epochs: int | None = None
    ns_dtype: str | None = None
    out_dir: str | pathlib.Path | None = None
    cache_dir: str | pathlib.Path = RESULTS / "cache"
    data: dict[str, Any] | None = None  # replaces the config's [data] source (not `context`)
    quiet: bool = False


def resolved(config: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    config = common.with_overrides(config, settings.ns_dtype, settings.epochs)
    config.setdefault("data", {})
    if settings.data is not None:
        context = config["data"].get("context", 255)
        config["data"] = {**settings.data, "context": context}
    return config


def load_data(config: dict[str, Any], settings: RunSettings) -> Data:
    return prepare_data(load_splits(config["data"]), config, settings.cache_dir)


def train_and_evaluate(
    config: dict[str, Any], settings: RunSettings | None = None, data: Data | None = None
) -> dict[str, Any]:
    """Trains one config; returns the history, best and last validation perplexity.

    Writes ``metrics.jsonl``, ``summary.md`` and ``curves.png`` under
    ``settings.out_dir`` when it is set. ``data`` (from :func:`load_data`) saves
    preparing the data again for several runs.
    """
    settings = settings or RunSettings()
    config = resolved(config, settings)
    data = data or load_data(config, settings)
    train = config["train"]
    batch_size, epochs = train.get("batch_size", 8), train["epochs"]
    eval_batch_size = train.get("eval_batch_size", 32)
    model = Qwen3(model_config(config, data.vocab_size))
    params = init_params(model, settings.seed)
    tx = common.optax_optimizer(
        config["optimizer"], muon_dimension_numbers=muon_dimension_numbers(params)
    )
    opt_state = jax.jit(tx.init)(params)
    train_step = make_train_step(model, tx, data.pad_id)
    evaluate_batch = make_evaluate_batch(model, data.pad_id)
    train_tokens = with_pad_row(data.train, data.pad_id)
    val_tokens = with_pad_row(data.validation, data.pad_id)
    val_batches = batch_indices(len(data.validation), eval_batch_size, None)
    rng = np.random.default_rng(settings.seed + 1_000_003)
    is_ars2 = config["optimizer"]["name"] == "ars2_neo"
    label = config["name"]
    recorder = common.RunRecorder(settings.out_dir, label)
    steps = math.ceil(len(data.train) / batch_size)
    bar = common.progress(epochs * steps, label, settings.quiet)

    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        sums = []
        for index in batch_indices(len(data.train), batch_size, rng):
            params, opt_state, step_sums = train_step(params, opt_state, train_tokens[index])
            sums.append(step_sums)
            if bar is not None:
                bar.update()
        train_nll, train_count = np.sum(jax.device_get(sums), axis=0)
        val_sums = [evaluate_batch(params, val_tokens[index]) for index in val_batches]
        val_nll, val_count = np.sum(jax.device_get(val_sums), axis=0)
        diagnostics = jax.device_get(ars2_jax.diagnostics(opt_state)) if is_ars2 else {}
        train_loss, val_loss = train_nll / train_count, val_nll / val_count
        row = {
            "epoch": epoch,
            "train_loss": float(train_loss),
            "train_ppl": math.exp(min(train_loss, 700.0)),
            "val_loss": float(val_loss),
            "val_ppl": math.exp(min(val_loss, 700.0)),
            **{k: float(v) for k, v in diagnostics.items() if k in DIAGNOSTICS},
            "epoch_seconds": time.perf_counter() - start,
            "wall_seconds": recorder.elapsed(),
        }
        recorder.record(row)
        if bar is not None:
            bar.set_postfix(ppl=f"{row['train_ppl']:.1f}/{row['val_ppl']:.1f}")
    if bar is not None:
        bar.close()

    history = recorder.history
    best = min(history, key=lambda r: r["val_ppl"])
    result = {
        "name": config["name"],
        "label": label,
        "history": history,
        "best_ppl": best["val_ppl"],
        "best_epoch": best["epoch"],
        "last_ppl": history[-1]["val_ppl"],
        "epoch_seconds": statistics.median(r["epoch_seconds"] for r in history),
        "train_sequences": len(data.train),
        "train_tokens": int(np.sum(data.train != data.pad_id)),
        "steps_per_epoch": steps,
    }
    extra = [
        f"- seed {settings.seed}, {len(history)} epochs of {steps} steps (batch {batch_size})",
        f"- best validation PPL {result['best_ppl']:.2f} (epoch {result['best_epoch']}), "
        f"last {result['last_ppl']:.2f}",
        f"- data: {len(data.train)} train sequences ({result['train_tokens']} tokens), "
        f"{len(data.validation)} validation sequences; vocabulary {data.vocab_size} "
        f"(`{data.tokenizer_path.name}`)",
        f"- median epoch (train + eval) {result['epoch_seconds']:.2f} s",
    ]
    if config["name"] in PUBLISHED:
        seed_best, seed_last = PUBLISHED[config["name"]]
        extra.append(f"- the seed's published best / last PPL: {seed_best:.2f} / {seed_last:.2f}")
    result["milestones"] = recorder.finish(MILESTONES, f"Optimizer: `{config['optimizer']}`", extra)
    if settings.out_dir is not None:
        common.plot_curves(
            pathlib.Path(settings.out_dir) / "curves.png", {label: history}, CURVES, log_x=False
        )
    return result


# --- several runs -----------------------------------------------------------------------


def compare(configs: list[dict[str, Any]], settings: RunSettings) -> tuple[list[dict], str]:
    """Runs every config on the same data; writes ``comparison.md`` and ``curves.png``."""
    out = pathlib.Path(settings.out_dir or RESULTS / "compare")
    out.mkdir(parents=True, exist_ok=True)
    prepared: dict[str, Data] = {}
    results, rows = [], []
    for config in configs:
        run_config = resolved(config, settings)
        key = json.dumps([run_config["data"], run_config.get("tokenizer", {})], sort_keys=True)
        if key not in prepared:
            prepared[key] = load_data(run_config, settings)
        result = train_and_evaluate(
            config,
            dataclasses.replace(settings, out_dir=out / config["name"]),
            prepared[key],
        )
        results.append(result)
        published = PUBLISHED.get(config["name"])
        rows.append(
            [
                config["name"],
                f"{result['best_ppl']:.2f} ({result['best_epoch']})",
                f"{result['last_ppl']:.2f}",
                "–" if published is None else f"{published[0]:.2f} / {published[1]:.2f}",
                f"{result['epoch_seconds']:.1f}",
            ]
        )
    columns = ["run", "best val PPL (epoch)", "last val PPL", "seed best / last", "epoch s"]
    header = f"# WikiText-2 comparison\n\nSeed {settings.seed}; validation perplexity."
    text = common.write_comparison(out / "comparison.md", header, columns, rows)
    common.plot_curves(
        out / "curves.png", {r["label"]: r["history"] for r in results}, CURVES, log_x=False
    )
    return results, text


# --- resources --------------------------------------------------------------------------


def estimate_resources(config: dict[str, Any], vocab_size: int | None = None) -> dict[str, Any]:
    """Parameter count and XLA's FLOP count of one train step, without running it.

    The step is lowered on abstract arrays (no memory, no compilation) and
    ``jax.stages.Lowered.cost_analysis`` counts its FLOPs: forward, backward,
    the adversarial pass when ARS2-Neo syncs (the A-GSAM step is counted as a
    sync step, an upper bound) and the optimizer's own work, with the
    Newton-Schulz iterations XLA's count misses added
    (:func:`experiments.common.newton_schulz_loop_flops`).
    """
    vocab_size = vocab_size or config.get("tokenizer", {}).get("vocab_size", 40479)
    model = Qwen3(model_config(config, vocab_size))
    params = jax.eval_shape(lambda: init_params(model, 0))
    tx = common.optax_optimizer(
        config["optimizer"], muon_dimension_numbers=muon_dimension_numbers(params)
    )
    opt_state = jax.eval_shape(tx.init, params)
    context = config.get("data", {}).get("context", 255)
    tokens = jax.ShapeDtypeStruct((config["train"].get("batch_size", 8), context), jnp.int32)
    lowered = make_train_step(model, tx, pad_id=1).lower(params, opt_state, tokens)
    optimizer = config["optimizer"]
    loop_flops = 0.0
    if optimizer["name"] == "ars2_neo":
        loop_flops = common.newton_schulz_loop_flops(params, optimizer.get("ns_steps", 5))
    return {
        "parameters": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
        "flops_per_step": float(lowered.cost_analysis()["flops"]) + loop_flops,
    }


# --- command line -----------------------------------------------------------------------


def _config_path(name_or_path: str) -> pathlib.Path:
    return common.config_path(name_or_path, CONFIG_DIR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="one run: a config file or a name in configs/wikitext2")
    parser.add_argument(
        "--compare",
        nargs="*",
        metavar="CONFIG",
        help=f"several runs into one table (default: {', '.join(DEFAULT_COMPARE)})",
    )
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    parser.add_argument("--ns-dtype", choices=sorted(common.DTYPES), help="ARS2-Neo's NS dtype")
    parser.add_argument("--out", help="output directory (default: results/wikitext2/...)")
    parser.add_argument(
        "--cache-dir", default=str(RESULTS / "cache"), help="where trained tokenizers are kept"
    )
    parser.add_argument(
        "--offline-sample",
        action="store_true",
        help="train on a small synthetic text in WikiText's format (no download)",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print parameters and FLOPs per step of the config instead of training",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.estimate:
        for name in [args.config] if args.config else DEFAULT_COMPARE:
            config = common.load_config(_config_path(name))
            print(json.dumps({"config": config["name"], **estimate_resources(config)}))
        return
    data = None
    if args.offline_sample:
        data = write_offline_sample(pathlib.Path(args.cache_dir) / "offline-sample")
    settings = RunSettings(
        seed=args.seed,
        epochs=args.epochs,
        ns_dtype=args.ns_dtype,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        data=data,
        quiet=args.quiet,
    )
    try:
        if args.config and args.compare is None:
            config = common.load_config(_config_path(args.config))
            out = args.out or RESULTS / config["name"]
            train_and_evaluate(config, dataclasses.replace(settings, out_dir=out))
            print(pathlib.Path(out, "summary.md").read_text())
            return
        names = args.compare or ([args.config] if args.config else list(DEFAULT_COMPARE))
        _, text = compare([common.load_config(_config_path(name)) for name in names], settings)
    except common.DataUnavailable as error:
        parser.exit(2, f"error: {error}\n")
    print(text)


if __name__ == "__main__":
    main()
