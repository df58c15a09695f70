"""ROME (Meng et al. 2022): find the key, the value and the key covariance of a one-fact edit.

For a request (subject, prompt, new object) at block ``l``:

- the key ``k*`` ``[d_mlp]`` is the MLP key (the input of the MLP output projection) at the last
  subject token, averaged over the prompt alone and behind a few short prefixes the model samples
  itself from BOS (top-5, seeded), so the edit answers to the subject in any context;
- the value ``v*`` ``[d]`` is the MLP output there plus an offset ``δ``, optimised with Adam so the
  model says the new object after each of those prompts, with ROME's penalties: a KL term that keeps
  the next-token distribution after essence prompts (``"{} is a"``), a weight decay on
  ``|δ|² / |v|²`` and a clamp of ``|δ|`` to a multiple of ``|v|``, ``v`` the MLP output on the plain prompt;
- the update of the ``[out, in]`` weight is ``ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)`` with
  ``C = E[k kᵀ]`` over corpus tokens (ROME eq. 2; ``W k*`` here includes the projection's bias), so
  ``W' k* = v*`` and keys uncorrelated with ``k*`` under ``C`` are left alone.

Deviations from the reference code, kept on purpose: ``W k*`` is taken at the averaged key (the paper's
formula) rather than at the plain prompt's key, and the KL term reads the distribution after the
essence prompt's last token (what "keep the subject's other predictions" asks) rather than at its
subject token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.tracing import subject_span
from lens.artifacts.edits import cached_covariance
from lens.artifacts.metadata import ModelRecord
from lens.config import DataConfig, InputError, RomeConfig
from lens.core.arch import get_component
from lens.core.components import edit_site, record_sites
from lens.data.sequences import token_sequences
from lens.interventions.rome import RankOneDelta


@dataclass(frozen=True)
class EditRequest:
    """What one edit asks: after ``prompt`` with ``subject`` written in, say ``target``."""

    subject: str
    prompt: str
    """Template with one ``{}`` for the subject, ending where the object comes."""
    target: str
    """The new object, as it continues the prompt (leading space)."""

    def text(self, template: str | None = None) -> str:
        return (self.prompt if template is None else template).replace("{}", self.subject)


def right_padded(rows: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids padded on the right (with ``tokenizer``'s pad token) and the ``[B, T]`` attention
    mask: causal attention never looks right, so every real token sees exactly what it sees alone,
    at the same positions."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def context_prefixes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, length: int, seed: int) -> list[str]:
    """``""`` (the plain prompt) and ``n`` texts of ``length`` tokens the model samples from BOS
    (top-5, seeded, the global RNG left as it was), each followed by ``". "``."""
    if n == 0:
        return [""]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n, 1), start, dtype=torch.long, device=model.device)  # [n, 1]
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5, max_new_tokens=length, min_new_tokens=length,
            pad_token_id=_pad_id(tokenizer),
        )  # [n, 1 + length]
    texts = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    return [""] + [" ".join(text.replace("{", " ").replace("}", " ").split()) + ". " for text in texts]


def subject_ids(tokenizer: PreTrainedTokenizerBase, text: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``text`` and the position of the last token of (the first) ``subject`` in it."""
    ids, (_, end) = subject_span(tokenizer, text, subject)
    return ids, end - 1


@torch.no_grad()
def mlp_keys(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, block: int, texts: Sequence[str], subject: str) -> torch.Tensor:
    """``[n, d_mlp]``: block ``block``'s MLP key at the last subject token of each text."""
    encoded = [subject_ids(tokenizer, text, subject) for text in texts]
    ids, mask = right_padded([row for row, _ in encoded], tokenizer, model.device)
    with record_sites(model, ("mlp_key",), [block]) as store:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    keys = store["mlp_key"][block]  # [n, T, d_mlp]
    return keys[torch.arange(len(texts)), torch.tensor([at for _, at in encoded])].float()


@dataclass
class RomeVectors:
    """The key and values of one edit at one block, and how the value was found."""

    block: int
    k_star: torch.Tensor  # [d_mlp]: mean key at the last subject token
    v_star: torch.Tensor  # [d]: the MLP output there that makes the model say the new object
    v_current: torch.Tensor  # [d]: what the MLP outputs for k* now (W k* + bias)
    prefixes: list[str]
    losses: list[dict[str, float]] = field(default_factory=list)
    """Per Adam step: the new object's NLL (nats/token), the KL term, the decay term, |δ| / |v|."""


def optimise_value(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, request: EditRequest, block: int, prefixes: Sequence[str], cfg: RomeConfig
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """``δ`` ``[d]`` added to block ``block``'s MLP output at the last subject token that makes the model
    say ``request.target`` after every prefixed prompt (ROME's value step), and its loss history."""
    target = tokenizer(request.target, add_special_tokens=False)["input_ids"]
    if not request.target.strip() or not target:
        raise InputError(f"target {request.target!r} has no token: name the new object, e.g. ' Rome' (leading space)")
    rows, at_subject, scored = [], [], []  # scored: (row, position, token) of every new-object token
    for prefix in prefixes:
        ids, at = subject_ids(tokenizer, prefix + request.text(), request.subject)
        scored += [(len(rows), len(ids) - 1 + j, token) for j, token in enumerate(target)]
        rows.append(ids + target[:-1])
        at_subject.append(at)
    essence_rows = []
    for template in cfg.essence_prompts:
        ids, at = subject_ids(tokenizer, request.text(template), request.subject)
        essence_rows.append((len(rows), len(ids) - 1))
        rows.append(ids)
        at_subject.append(at)
    ids, mask = right_padded(rows, tokenizer, model.device)  # [B, T]
    where = torch.zeros(*ids.shape, 1, device=model.device)  # [B, T, 1]: 1 at each row's last subject token
    where[torch.arange(len(rows)), torch.tensor(at_subject)] = 1.0
    row, pos, tok = (torch.tensor(column, device=model.device) for column in zip(*scored))
    e_row, e_pos = (torch.tensor(column, device=model.device) for column in zip(*essence_rows))

    with torch.no_grad(), record_sites(model, ("mlp",), [block]) as store:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
    kl_init = logits[e_row, e_pos].float().log_softmax(-1)  # [E, V]
    v_plain = store["mlp"][block][0, at_subject[0]].float()  # [d]: the plain prompt's MLP output
    v_norm = float(v_plain.norm())

    delta = torch.zeros_like(v_plain, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=cfg.lr)
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.steps), desc=f"ROME value, block {block}", unit="step", leave=False)
    for _ in bar:
        with edit_site(model, block, "mlp", lambda out: out + where.to(out.dtype) * delta.to(out.dtype)):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
        nll = -logits[row, pos].float().log_softmax(-1)[torch.arange(len(tok)), tok].mean()
        kl = F.kl_div(logits[e_row, e_pos].float().log_softmax(-1), kl_init, log_target=True, reduction="batchmean")
        decay = cfg.weight_decay * delta.norm() ** 2 / v_norm**2
        history.append({"nll": nll.item(), "kl": kl.item(), "decay": decay.item(), "delta_over_v": delta.detach().norm().item() / v_norm})
        bar.set_postfix(nll=f"{nll.item():.3f}")
        if nll.item() < cfg.stop_nll:
            break
        optimizer.zero_grad()
        (nll + cfg.kl_factor * kl + decay).backward()
        optimizer.step()
        with torch.no_grad():
            limit = cfg.clamp_norm * v_norm
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return delta.detach(), history


def rome_vectors(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, request: EditRequest, block: int, prefixes: Sequence[str], cfg: RomeConfig
) -> RomeVectors:
    """``k*``, ``v*`` and the current value ``W k*`` of one edit at block ``block`` (the "value-space
    direction" step collects ``v* − v_current`` over many edits)."""
    k_star = mlp_keys(model, tokenizer, block, [prefix + request.text() for prefix in prefixes], request.subject).mean(0)  # [d_mlp]
    delta, history = optimise_value(model, tokenizer, request, block, prefixes, cfg)
    with torch.no_grad():
        projection = get_component(model, block, "mlp_out")
        v_current = projection(k_star[None].to(model.dtype))[0].float()  # [d]
    return RomeVectors(block, k_star.cpu(), (v_current + delta).cpu(), v_current.cpu(), list(prefixes), history)


def rank_one_delta(model: PreTrainedModel, vectors: RomeVectors, covariance: torch.Tensor, request: EditRequest) -> RankOneDelta:
    """``ΔW = v uᵀ`` with ``u = C⁻¹k* / (C⁻¹k*)ᵀk*`` and ``v = v* − W k*``, solved in float64."""
    k = vectors.k_star.double()
    solved, info = torch.linalg.solve_ex(covariance.double().cpu(), k)  # [d_mlp]: C⁻¹k*
    along = float(solved @ k)
    if int(info) != 0 or not math.isfinite(along) or along <= 0:
        raise InputError(
            f"the key covariance of block {vectors.block} is singular or not positive definite along k*: "
            "estimate it from more tokens (rome.covariance_tokens)"
        )
    details = {
        "method": "rome",
        "subject": request.subject,
        "prompt": request.prompt,
        "target_new": request.target,
        "prefixes": vectors.prefixes,
        "steps": len(vectors.losses),
        "final_nll": vectors.losses[-1]["nll"] if vectors.losses else None,
    }
    u = (solved / along).float()  # [d_mlp], u·k* = 1
    v = vectors.v_star - vectors.v_current  # [d]
    return RankOneDelta(vectors.block, u, v, details, ModelRecord.of(model))


def corpus_name(data: DataConfig) -> str:
    """What identifies the covariance's tokens, for its cache key."""
    return f"{data.dataset}|{data.subset}|{data.split}|seq_len={data.seq_len}|eval_percent={data.eval_percent:g}"


class _Enough(Exception):
    """Raised by the key hook: nothing after block ``l``'s MLP key is needed."""


@torch.no_grad()
def estimate_key_covariance(model: PreTrainedModel, sequences: Iterable[torch.Tensor], block: int, tokens: int, batch_size: int) -> torch.Tensor:
    """``[d_mlp, d_mlp]``: ``E[k kᵀ]`` of block ``block``'s MLP keys over the first ``tokens`` tokens
    of ``sequences`` (``[T]`` each), accumulated in float64; the blocks above ``block`` never run."""
    total: torch.Tensor | None = None
    seen, batch = 0, []
    grabbed: list[torch.Tensor] = []

    def grab(keys: torch.Tensor) -> torch.Tensor:  # [B, T, d_mlp]
        grabbed.append(keys)
        raise _Enough

    def run(batch: list[torch.Tensor]) -> None:
        nonlocal total, seen
        with edit_site(model, block, "mlp_key", grab):
            try:
                model(input_ids=torch.stack(batch).to(model.device), use_cache=False)
            except _Enough:
                pass
        keys = grabbed.pop().flatten(0, 1)[: tokens - seen].double()  # [n, d_mlp]
        total = keys.T @ keys if total is None else total + keys.T @ keys
        seen += keys.shape[0]
        bar.update(keys.shape[0])

    bar = tqdm(total=tokens, desc=f"key covariance, block {block}", unit="tok")
    for sequence in sequences:
        batch.append(sequence)
        if len(batch) == batch_size:
            run(batch)
            batch = []
        if seen >= tokens:
            break
    if batch and seen < tokens:
        run(batch)
    bar.close()
    if total is None or seen < tokens:
        raise InputError(f"the corpus gave {seen} tokens, fewer than rome.covariance_tokens={tokens}: lower it or give a larger corpus")
    return total / seen


def key_covariance(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DataConfig, block: int, tokens: int
) -> tuple[torch.Tensor, Path, bool]:
    """The MLP-key covariance of block ``block`` over ``tokens`` training tokens of ``data``, from the
    cache when it is there (keyed by model fingerprint, block, corpus, token count); also the cache file
    and whether it was read from it."""
    limit = math.ceil(tokens / data.seq_len)

    def compute() -> torch.Tensor:
        sequences = token_sequences(data, tokenizer, held_out=False, limit=limit)
        return estimate_key_covariance(model, sequences, block, tokens, data.batch_size)

    return cached_covariance(model, block, corpus_name(data), tokens, compute)
