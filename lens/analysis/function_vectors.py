"""Function vectors (Todd et al. 2024): a task carried by a few attention heads, as one residual vector.

1. Mean output of every head (the ``heads`` site: the input of the attention's output projection,
   cut into ``n_heads`` slices) at the final token of clean in-context prompts.
2. Average indirect effect (AIE) of a head: in prompts whose demonstrations have shuffled labels,
   replace the head's output at the final token by its clean mean; the gain in probability of the
   answer's first token over the unpatched shuffled run, averaged over prompts.
3. The function vector: the sum over the top-k heads of their mean output mapped through their
   slice of the output projection (each head's contribution to the residual, bias excluded).
4. Added to the residual after ``layer`` blocks at the final token of zero-shot prompts.

Patching one head at the final token changes nothing before that token, so the shuffled prompt's
prefix runs once (its key/value cache kept) and every head's patch is one row of a single-token
batch on top of it. Prompts are batched by token length, so no padding enters any run.
"""

from __future__ import annotations

import copy
import inspect
import random
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.intervention_eval import Interval, mean_difference_ci, wilson_interval
from lens.config import InputError, PromptTemplate
from lens.core.arch import get_component, n_blocks
from lens.core.components import edit_site, n_heads, out_in_weight, record_sites
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed
from lens.data.batches import equal_length_batches
from lens.data.tasks import Pair, TaskSplit, answer_text, format_prompt
from lens.interventions import ResidualAdd
from lens.interventions.steering import prompt_ids

Head = tuple[int, int]
"""``(block, head)``."""


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt and the first token of its answer (what accuracy and AIE score)."""

    text: str
    ids: tuple[int, ...]
    answer: int


def make_prompts(
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Sequence[Pair],
    queries: Sequence[Pair],
    shots: int,
    rng: random.Random,
    shuffle_labels: bool = False,
    template: PromptTemplate = "colon",
) -> list[Prompt]:
    """One prompt per query: ``shots`` demonstrations drawn without the query itself; with
    ``shuffle_labels`` their outputs are permuted among them (the corrupted prompts of the AIE)."""
    prompts = []
    for x, y in queries:
        pool = [pair for pair in demonstrations if pair[0] != x]
        if shots > len(pool):
            raise InputError(f"{shots} shots asked, but only {len(pool)} demonstration pairs: lower shots or enlarge the word list")
        demos = rng.sample(pool, shots)
        if shuffle_labels:
            outputs = [out for _, out in demos]
            rng.shuffle(outputs)
            demos = [(inp, out) for (inp, _), out in zip(demos, outputs)]
        text = format_prompt(demos, x, template)
        answer = tokenizer(answer_text(y), add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(text, tuple(prompt_ids(tokenizer, text)), answer[0]))
    return prompts


def length_batches(prompts: Sequence[Prompt], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices, ids [B, T])`` for prompts of equal length ``T``, so the final token is column -1 of every row."""
    for chunk in equal_length_batches([len(prompt.ids) for prompt in prompts], batch_size):
        yield chunk, torch.tensor([prompts[i].ids for i in chunk])


def head_dim(model: PreTrainedModel) -> int:
    """Width of one head's slice of the ``heads`` site (the output projection's input / n_heads)."""
    width = out_in_weight(get_component(model, 0, "attention_out")).shape[1]
    return width // n_heads(model)


@torch.no_grad()
def head_means(model: PreTrainedModel, prompts: Sequence[Prompt], batch_size: int = 16) -> torch.Tensor:
    """``[L, H, head_dim]``: every head's output at the final token, averaged over ``prompts``."""
    if not prompts:
        raise InputError("head means need at least one prompt")
    total = torch.zeros(n_blocks(model), n_heads(model), head_dim(model))
    with record_sites(model, ("heads",)) as store:
        for _, ids in length_batches(prompts, batch_size):
            model(input_ids=ids.to(model.device), use_cache=False)
            last = torch.stack([store["heads"][b][:, -1] for b in range(n_blocks(model))])  # [L, B, H * hd]
            total += last.float().cpu().reshape(*last.shape[:2], *total.shape[1:]).sum(1)
    return total / len(prompts)


@contextmanager
def patched_heads(model: nn.Module, rows: Sequence[Head | None], values: torch.Tensor) -> Iterator[None]:
    """Within the block, batch row ``i`` of every forward pass has head ``rows[i]`` replaced by
    ``values[block, head]`` (``[L, H, head_dim]``) at the final token; ``None`` rows stay as they are."""
    hd = values.shape[-1]
    by_block: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for row, head in enumerate(rows):
        if head is not None:
            by_block[head[0]].append((row, head[1]))
    with ExitStack() as stack:
        for block, patches in by_block.items():

            def edit(tensor: torch.Tensor, block: int = block, patches: list[tuple[int, int]] = patches) -> torch.Tensor:
                if tensor.shape[0] != len(rows):
                    raise ValueError(f"patched_heads got a batch of {tensor.shape[0]} rows for {len(rows)} patch rows")
                tensor = tensor.clone()  # [B, T, H * hd]
                for row, head in patches:
                    tensor[row, -1, head * hd : (head + 1) * hd] = values[block, head].to(tensor)
                return tensor

            stack.enter_context(edit_site(model, block, "heads", edit))
        yield


def answer_probs(logits: torch.Tensor, answers: Sequence[int]) -> torch.Tensor:
    """``[B]``: probability of each row's answer under the final-token logits ``[B, V]``."""
    return logits.float().softmax(-1)[torch.arange(len(answers)), torch.tensor(answers, device=logits.device)]


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a key/value cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The key/value cache a forward pass returned, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


@torch.no_grad()
def indirect_effects(model: PreTrainedModel, prompts: Sequence[Prompt], means: torch.Tensor, head_batch: int = 512) -> torch.Tensor:
    """``[P, L, H]``: per prompt, P(answer) with one head's final-token output set to ``means``
    minus P(answer) unpatched. Mean over prompts is the AIE."""
    n_layers, n_head = means.shape[:2]
    heads: list[Head] = [(b, h) for b in range(n_layers) for h in range(n_head)]
    effects = torch.zeros(len(prompts), n_layers, n_head)
    for p, prompt in enumerate(tqdm(prompts, desc="indirect effects", leave=False)):
        if len(prompt.ids) < 2:
            raise InputError(f"prompt {prompt.text!r} is one token: indirect effects run its prefix first, so give demonstrations")
        ids = torch.tensor([prompt.ids], device=model.device)  # [1, T]
        prefix = cache_of(model(input_ids=ids[:, :-1], use_cache=True))
        for start in range(0, len(heads), head_batch):
            rows: list[Head | None] = [None, *heads[start : start + head_batch]]
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(rows))
            with patched_heads(model, rows, means):
                step = {"input_ids": ids[:, -1:].expand(len(rows), 1), cache_argument(model): cache, "use_cache": True}
                logits = model(**step).logits[:, -1]
            probs = answer_probs(logits, [prompt.answer] * len(rows)).cpu()  # [R]
            for (block, head), prob in zip(rows[1:], probs[1:]):  # type: ignore[misc]
                effects[p, block, head] = prob - probs[0]
    return effects


def top_heads(aie: torch.Tensor, k: int) -> list[Head]:
    """The ``k`` heads of largest AIE (``[L, H]``), best first."""
    if not 1 <= k <= aie.numel():
        raise InputError(f"top_heads={k}: the model has {aie.numel()} heads ({aie.shape[0]} blocks x {aie.shape[1]}); choose 1..{aie.numel()}")
    order = aie.flatten().topk(k).indices.tolist()
    return [divmod(i, aie.shape[1]) for i in order]


def head_contributions(model: PreTrainedModel, block: int, heads_out: torch.Tensor) -> torch.Tensor:
    """``[..., H * hd] -> [..., H, d]``: what each head adds to the residual through its slice of the
    output projection (without the projection's bias, added once per block, not per head)."""
    weight = out_in_weight(get_component(model, block, "attention_out"))  # [d, H * hd]
    n_head = n_heads(model)
    split = heads_out.reshape(*heads_out.shape[:-1], n_head, -1)  # [..., H, hd]
    per_head = weight.reshape(weight.shape[0], n_head, -1).to(split)  # [d, H, hd]
    return torch.einsum("...hk,dhk->...hd", split, per_head)


def function_vector(model: PreTrainedModel, means: torch.Tensor, heads: Sequence[Head]) -> torch.Tensor:
    """``[d]``: the sum of the chosen heads' mean contributions to the residual."""
    vector = torch.zeros(model.config.hidden_size)
    for block, head in heads:
        vector += head_contributions(model, block, means[block].flatten())[head].float().cpu()
    return vector


def final_token_add(model: PreTrainedModel, layer: int, vector: torch.Tensor, length: int) -> ResidualAdd:
    """Add ``vector`` to the residual after ``layer`` blocks at position ``length - 1`` only."""
    return ResidualAdd(model, layer, rows=vector.float()[None], start=length - 1)


@torch.no_grad()
def final_logits(
    model: PreTrainedModel, prompts: Sequence[Prompt], layer: int | None = None, vector: torch.Tensor | None = None, batch_size: int = 32
) -> torch.Tensor:
    """``[P, V]``: the model's final-token logits, with ``vector`` added at ``layer`` when given."""
    out = torch.zeros(len(prompts), model.config.vocab_size)
    for indices, ids in length_batches(prompts, batch_size):
        with ExitStack() as stack:
            if vector is not None and layer is not None:
                stack.enter_context(final_token_add(model, layer, vector, ids.shape[1]))
            logits = model(input_ids=ids.to(model.device), use_cache=False).logits[:, -1]
        out[indices] = logits.float().cpu()[:, : out.shape[1]]
    return out


@dataclass
class Scores:
    """First-token accuracy and mean answer probability of a set of prompts."""

    correct: list[bool]
    prob: list[float]

    @classmethod
    def of(cls, logits: torch.Tensor, prompts: Sequence[Prompt]) -> "Scores":
        answers = [p.answer for p in prompts]
        hit = logits.argmax(-1) == torch.tensor(answers)
        return cls(hit.tolist(), answer_probs(logits, answers).tolist())

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def mean_prob(self) -> float:
        return sum(self.prob) / len(self.prob)


def score(model: PreTrainedModel, prompts: Sequence[Prompt], layer: int | None = None, vector: torch.Tensor | None = None) -> Scores:
    return Scores.of(final_logits(model, prompts, layer, vector), prompts)


@dataclass
class Comparison:
    """Accuracy of the same prompts without and with the function vector, and the paired gain."""

    before: Interval
    after: Interval
    gain: Interval
    """Mean over prompts of (correct after - correct before), Student-t interval."""
    prob_before: float
    prob_after: float

    @classmethod
    def of(cls, before: Scores, after: Scores, confidence: float) -> "Comparison":
        diff = torch.tensor(after.correct, dtype=torch.float64) - torch.tensor(before.correct, dtype=torch.float64)
        return cls(
            wilson_interval(sum(before.correct), len(before.correct), confidence),
            wilson_interval(sum(after.correct), len(after.correct), confidence),
            mean_difference_ci(diff, confidence),
            before.mean_prob,
            after.mean_prob,
        )

    def line(self, name: str) -> str:
        b, a, g = self.before, self.after, self.gain
        pct = int(round(100 * b.confidence))
        return (
            f"{name}: {b.mean:.1%} [{b.low:.1%}, {b.high:.1%}] -> {a.mean:.1%} [{a.low:.1%}, {a.high:.1%}] "
            f"(gain {g.mean:+.1%} [{g.low:+.1%}, {g.high:+.1%}], {pct}% CI, n={b.n})"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AnswerReading:
    """The lens' view of the answer at the final token, per layer (residual after n blocks)."""

    prob: list[float]
    """Mean probability of the answer's first token."""
    top1: list[float]
    """Fraction of prompts where it is the lens' top-1."""
    median_rank: list[float]
    """Median rank of it (0 = top-1)."""
    top1_from: list[int | None]
    """Per prompt: the lowest layer from which it is top-1 at every later layer (None: not top-1 at the output)."""


@torch.no_grad()
def lens_reading(
    model: PreTrainedModel, lens: Lens, prompts: Sequence[Prompt], layer: int | None = None, vector: torch.Tensor | None = None
) -> AnswerReading:
    """Read every layer's final-token residual through ``lens``, with ``vector`` added at ``layer`` when given."""
    unembed = Unembed(model)
    ranks = torch.zeros(len(prompts), n_blocks(model) + 1, dtype=torch.long)
    probs = torch.zeros(ranks.shape)
    for indices, ids in length_batches(prompts, 32):
        with ExitStack() as stack:
            if vector is not None and layer is not None:
                stack.enter_context(final_token_add(model, layer, vector, ids.shape[1]))
            residuals, _ = capture_residuals(model, ids.to(model.device), logits=False)  # [L+1, B, T, d]
        logp = unembed(lens.translate(residuals[:, :, -1])).float().log_softmax(-1)  # [L+1, B, V]
        answers = torch.tensor([prompts[i].answer for i in indices], device=logp.device)
        target = logp.gather(-1, answers[None, :, None].expand(logp.shape[0], -1, 1))  # [L+1, B, 1]
        ranks[indices] = (logp > target).sum(-1).T.cpu()
        probs[indices] = target[..., 0].exp().T.cpu()
    top = ranks == 0  # [P, L+1]
    tail_all_top = top.flip(1).cumprod(1).flip(1).bool()  # [P, L+1]: top-1 here and at every later layer
    first = [int(row.nonzero()[0]) if row[-1] else None for row in tail_all_top]
    return AnswerReading(
        probs.mean(0).tolist(), top.float().mean(0).tolist(), ranks.float().median(0).values.tolist(), first
    )


@dataclass
class FunctionVectorStudy:
    """Everything one function-vector run measures on one task."""

    task: str
    template: str
    shots: int
    aie: torch.Tensor
    """``[L, H]``: average indirect effect of every head (change in probability of the answer)."""
    heads: list[Head]
    vector: torch.Tensor
    """``[d]``: the function vector."""
    vector_tokens: list[str]
    """Top tokens of the vector read by the final norm + unembedding."""
    layers: list[int]
    val_accuracy: list[float]
    """Zero-shot validation accuracy with the vector added at each of ``layers``."""
    val_baseline: float
    layer: int
    """The injection layer chosen on the validation split."""
    zero_shot: Comparison
    icl: Interval
    """Accuracy of clean ``shots``-shot prompts of the test words, for reference."""
    shuffled: Comparison | None
    lens: str
    reading_before: AnswerReading
    reading_after: AnswerReading
    counts: dict[str, int]
    """Prompts and words used by each step."""

    def lines(self) -> list[str]:
        heads = ", ".join(f"{b}.{h}" for b, h in self.heads)
        out = [
            f"task {self.task} ({self.template} prompts): top {len(self.heads)} heads (block.head) {heads}; |FV| = {float(self.vector.norm()):.2f}",
            f"injection layer {self.layer} (validation accuracy {self.val_baseline:.1%} -> {max(self.val_accuracy):.1%})",
            self.zero_shot.line("zero-shot test accuracy"),
            f"{self.shots}-shot clean test accuracy {self.icl.mean:.1%} [{self.icl.low:.1%}, {self.icl.high:.1%}]",
        ]
        if self.shuffled is not None:
            out.append(self.shuffled.line(f"{self.shots}-shot shuffled-label test accuracy"))
        before = sum(x is not None for x in self.reading_before.top1_from)
        start = sorted(layer for layer in self.reading_after.top1_from if layer is not None)
        out.append(
            f"{self.lens}: answer top-1 at the output in {before} -> {len(start)} of {len(self.reading_after.top1_from)} zero-shot test prompts"
            + (f"; with the FV it is top-1 from layer {start[len(start) // 2]} on (median over those)" if start else "")
        )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "template": self.template,
            "shots": self.shots,
            "heads": [{"block": b, "head": h, "aie": float(self.aie[b, h])} for b, h in self.heads],
            "aie": self.aie.tolist(),
            "vector_norm": float(self.vector.norm()),
            "vector_tokens": self.vector_tokens,
            "layers": self.layers,
            "val_accuracy": self.val_accuracy,
            "val_baseline": self.val_baseline,
            "layer": self.layer,
            "zero_shot": self.zero_shot.to_json(),
            "icl": self.icl.to_json(),
            "shuffled": None if self.shuffled is None else self.shuffled.to_json(),
            "lens": self.lens,
            "reading_before": asdict(self.reading_before),
            "reading_after": asdict(self.reading_after),
            "counts": self.counts,
        }


def queries_from(pairs: Sequence[Pair], n: int, rng: random.Random) -> list[Pair]:
    """``n`` query pairs: every pair once in shuffled order while they last, then again."""
    out: list[Pair] = []
    while len(out) < n:
        out += rng.sample(list(pairs), min(len(pairs), n - len(out)))
    return out


def study_function_vector(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lens: Lens,
    split: TaskSplit,
    task: str,
    shots: int = 10,
    mean_prompts: int = 40,
    aie_prompts: int = 20,
    k: int = 10,
    layers: Sequence[int] = (),
    confidence: float = 0.95,
    shuffled_eval: bool = True,
    seed: int = 0,
    template: PromptTemplate = "colon",
) -> FunctionVectorStudy:
    """Head means and AIE on the train words, the layer on the validation words, accuracy and the
    lens reading on the test words."""
    rng = random.Random(seed)
    n_layers = n_blocks(model)
    layers = list(layers) or list(range(n_layers + 1))
    clean = make_prompts(tokenizer, split.train, queries_from(split.train, mean_prompts, rng), shots, rng, template=template)
    means = head_means(model, clean)
    corrupted = make_prompts(tokenizer, split.train, queries_from(split.train, aie_prompts, rng), shots, rng, True, template)
    aie = indirect_effects(model, corrupted, means).mean(0)  # [L, H]
    heads = top_heads(aie, k)
    vector = function_vector(model, means, heads)

    val = make_prompts(tokenizer, split.train, split.val, 0, rng, template=template)
    val_baseline = score(model, val)
    val_scores = [score(model, val, layer, vector) for layer in tqdm(layers, desc="injection layers", leave=False)]
    best = max(range(len(layers)), key=lambda i: (val_scores[i].accuracy, val_scores[i].mean_prob))
    layer = layers[best]

    test = make_prompts(tokenizer, split.train, split.test, 0, rng, template=template)
    zero_shot = Comparison.of(score(model, test), score(model, test, layer, vector), confidence)
    icl_scores = score(model, make_prompts(tokenizer, split.train, split.test, shots, rng, template=template))
    icl = wilson_interval(sum(icl_scores.correct), len(icl_scores.correct), confidence)
    shuffled = None
    if shuffled_eval:
        mixed = make_prompts(tokenizer, split.train, split.test, shots, rng, True, template)
        shuffled = Comparison.of(score(model, mixed), score(model, mixed, layer, vector), confidence)
    with torch.no_grad():
        read = Unembed(model)(vector.to(model.device, next(model.parameters()).dtype)).float()  # [V]
    tokens = [tokenizer.decode([i]) for i in read.topk(10).indices.tolist()]
    return FunctionVectorStudy(
        task=task,
        template=template,
        shots=shots,
        aie=aie,
        heads=heads,
        vector=vector,
        vector_tokens=tokens,
        layers=layers,
        val_accuracy=[s.accuracy for s in val_scores],
        val_baseline=val_baseline.accuracy,
        layer=layer,
        zero_shot=zero_shot,
        icl=icl,
        shuffled=shuffled,
        lens=lens.origin,
        reading_before=lens_reading(model, lens, test),
        reading_after=lens_reading(model, lens, test, layer, vector),
        counts={
            "train_words": len(split.train),
            "val_words": len(split.val),
            "test_words": len(split.test),
            "mean_prompts": len(clean),
            "aie_prompts": len(corrupted),
        },
    )
