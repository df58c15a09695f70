"""Causal tracing (Meng et al. 2022, ROME): which states of the network carry a fact about a subject.

Noise on the subject's token embeddings makes the model lose the fact; putting back one state of the
clean run, a (token, block) of the residual, the MLP output or the attention output, into the
corrupted run shows how much of the true object's probability that one state brings back. States
that bring much back are the ones the rest of the computation reads the fact from.

The noise is ``noise`` x ``std`` Gaussian, where ``std`` defaults to the std of the entries of the
model's input-embedding matrix (every token's embedding: a property of the model alone, the same for
every fact; ROME takes the std over the subject tokens of its fact set instead). It is added to the
residual entering block 0 (site ``block_in`` of block 0, the embedding output) at the subject's
tokens, with ``samples`` draws from a generator seeded by ``seed``; every probability is the mean over
the draws, read at the prompt's last token.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence, get_args

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.known_facts import first_token
from lens.analysis.picture import token_label
from lens.config import InputError, TraceKind
from lens.core.arch import n_blocks
from lens.core.components import edit_site, record_sites
from lens.core.residuals import record_residuals
from lens.core.translators import Lens, Unembed
from lens.data.facts import Fact, evenly_spaced
from lens.interventions.surgery import LayerProgram

TRACE_KINDS: tuple[str, ...] = get_args(TraceKind)
WINDOWED = ("mlp", "attention")
"""Kinds that also get a window variant (``<kind>_window``)."""

Plan = dict[tuple[str, int], Sequence[int]]
"""One restoration: ``(site, block) -> token positions`` put back to their clean values."""


def embedding_std(model: PreTrainedModel) -> float:
    """Std of the entries of the input-embedding matrix: the scale the default noise is a multiple of."""
    return float(model.get_input_embeddings().weight.float().std())


def subject_span(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``prompt`` and the token span ``[start, end)`` of the first occurrence of ``subject``.

    The subject must start and end on token boundaries (a token may carry the space before it), so
    the noise covers exactly the subject; otherwise the error names the subject that would fit."""
    if not subject.strip():
        raise InputError("the subject is empty: name the subject as written in the prompt")
    at = prompt.find(subject)
    if at < 0:
        raise InputError(f"subject {subject!r} does not occur in prompt {prompt!r}: write it exactly as in the prompt")
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise InputError(f"{type(tokenizer).__name__} gives no character offsets: tracing needs a fast tokenizer") from err
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    begin, stop = at, at + len(subject)
    inside = [i for i, (s, e) in enumerate(offsets) if s < stop and e > begin]  # special tokens have (0, 0)
    first, last = inside[0], inside[-1]
    covered = prompt[offsets[first][0] : offsets[last][1]]
    if prompt[offsets[first][0] : begin].strip() or offsets[last][1] != stop:
        pieces = [prompt[s:e] for s, e in offsets[first : last + 1]]
        raise InputError(
            f"subject {subject!r} does not start and end on token boundaries of the prompt (its tokens are {pieces}): "
            f"give subject={covered.strip()!r}, or reword the prompt"
        )
    return ids, (first, last + 1)


@dataclass
class Corruption:
    """One prompt with its subject corrupted: what the clean run computed and the noise, so that any
    set of restorations can be run against it."""

    prompt: str
    subject: str
    input_ids: torch.Tensor  # [T]
    tokens: list[str]  # [T] display labels
    span: tuple[int, int]  # subject tokens [start, end)
    target_id: int
    target: str
    noise: torch.Tensor  # [S, n_subject, d], already scaled
    clean: dict[str, dict[int, torch.Tensor]]  # site -> block -> [T, d] state of the clean run
    clean_prob: float
    noise_std: float  # absolute std of the noise
    seed: int
    corrupted_prob: float = math.nan
    """The target's probability with nothing restored, mean over the noise draws."""
    corrupted_in: dict[int, torch.Tensor] = field(default_factory=dict)
    """block -> ``[S, T, d]``: the residual entering it in the corrupted run, so a batch whose
    restorations all lie at or after block ``b`` starts at ``b`` instead of re-running blocks ``0..b-1``."""

    @property
    def samples(self) -> int:
        return self.noise.shape[0]

    @property
    def last_subject(self) -> int:
        return self.span[1] - 1

    def clean_state(self, site: str, block: int) -> torch.Tensor:
        """``[T, d]``: ``site`` of ``block`` in the clean run."""
        if site not in self.clean:
            raise InputError(f"site {site!r} cannot be restored; restorable sites are {sorted(self.clean)}")
        if block not in self.clean[site]:
            raise InputError(f"block {block!r} out of range: valid blocks are 0..{len(self.clean[site]) - 1}")
        return self.clean[site][block]

    @contextmanager
    def applied(self, model: PreTrainedModel, plans: Sequence[Plan], start: int = 0) -> Iterator[torch.Tensor]:
        """Within the block the model runs ``len(plans) x samples`` corrupted copies of the prompt (the
        yielded ids ``[G*S, T]``), copy ``(g, s)`` with noise draw ``s`` and restoration ``plans[g]``.

        With ``start > 0`` blocks ``0..start-1`` are skipped and block ``start`` gets the corrupted
        run's residual instead (what they would compute: no plan may restore a state before it)."""
        groups, samples, n_tok = len(plans), self.samples, len(self.input_ids)
        first, stop = self.span
        noise = self.noise.to(model.device)

        def add_noise(x: torch.Tensor) -> torch.Tensor:  # [G*S, T, d]
            x = x.clone(memory_format=torch.contiguous_format)
            x.view(groups, samples, *x.shape[1:])[:, :, first:stop] += noise.to(x.dtype)
            return x

        masks: dict[tuple[str, int], torch.Tensor] = {}
        for g, plan in enumerate(plans):
            for key, positions in plan.items():
                masks.setdefault(key, torch.zeros(groups, n_tok, dtype=torch.bool))[g, list(positions)] = True

        def restore(mask: torch.Tensor, clean: torch.Tensor):  # [G, T], [T, d]
            mask, clean = mask.to(clean.device)[:, None, :, None], clean[None, None]

            def edit(x: torch.Tensor) -> torch.Tensor:  # [G*S, T, d]
                return torch.where(mask, clean.to(x.dtype), x.unflatten(0, (groups, samples))).flatten(0, 1)

            return edit

        with ExitStack() as stack:
            stack.enter_context(edit_site(model, 0, "block_in", add_noise))
            for (site, block), mask in masks.items():
                if block < start:
                    raise ValueError(f"a plan restores block {block}, before the first block run ({start})")
                stack.enter_context(edit_site(model, block, site, restore(mask, self.clean_state(site, block))))  # type: ignore[arg-type]
            if start > 0:  # hooks first: under the program, block indices name its slots
                corrupted = self.corrupted_in[start].to(model.device)  # [S, T, d]
                stack.enter_context(edit_site(model, start, "block_in", lambda x: corrupted.to(x.dtype).repeat(groups, 1, 1)))
                stack.enter_context(LayerProgram.skip(model, 0, start))
            yield self.input_ids.to(model.device).expand(groups * samples, -1)

    @torch.no_grad()
    def probs(self, model: PreTrainedModel, plans: Sequence[Plan]) -> torch.Tensor:
        """``[G]``: the target's probability at the last token under each plan, mean over the noise draws."""
        start = min((block for plan in plans for _, block in plan), default=0) if all(plans) else 0
        with self.applied(model, plans, start if start in self.corrupted_in else 0) as ids:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]  # [G*S, V]
        return logits.float().softmax(-1)[:, self.target_id].view(len(plans), self.samples).mean(1).cpu()


@torch.no_grad()
def corrupt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    target: str | None = None,
    *,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    std: float | None = None,
) -> Corruption:
    """Run the clean prompt once (recording every block's output, MLP and attention output) and draw
    the noise: ``noise`` x ``std`` (default ``embedding_std(model)``), ``samples`` draws seeded by ``seed``."""
    if samples < 1 or noise < 0:
        raise InputError(f"need samples >= 1 and noise >= 0, got samples={samples}, noise={noise}")
    ids, span = subject_span(tokenizer, prompt, subject)
    input_ids = torch.tensor(ids)  # [T]
    with record_sites(model, TRACE_KINDS) as store:
        logits = model(input_ids=input_ids[None].to(model.device), use_cache=False, logits_to_keep=1).logits[0, -1]  # [V]
    probs = logits.float().softmax(-1)
    tid = int(probs.argmax()) if target is None else first_token(tokenizer, target)
    clean = {site: {block: state[0] for block, state in blocks.items()} for site, blocks in store.items()}
    scale = noise * (embedding_std(model) if std is None else std)
    d = clean["block_out"][0].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, span[1] - span[0], d, generator=generator) * scale  # [S, n_subject, d]
    tokens = [token_label(tokenizer, i) for i in ids]
    corruption = Corruption(prompt, subject, input_ids, tokens, span, tid, token_label(tokenizer, tid), draws, clean, float(probs[tid]), scale, seed)
    with corruption.applied(model, [{}]) as noisy, record_sites(model, ("block_in",)) as store:
        logits = model(input_ids=noisy, use_cache=False, logits_to_keep=1).logits[:, -1]  # [S, V]
    corruption.corrupted_prob = float(logits.float().softmax(-1)[:, tid].mean())
    corruption.corrupted_in = store["block_in"]
    return corruption


def probability_rows(values: torch.Tensor) -> list[list[float | None]]:
    """``[R, C]`` probabilities as JSON rows, 6 decimals (a corrupted probability can be 1e-4), NaN as None."""
    return [[None if math.isnan(x) else round(x, 6) for x in row] for row in values.tolist()]


def window_blocks(block: int, window: int, total: int) -> range:
    """The ``window`` blocks centred on ``block`` (``block - window // 2`` on), clipped to ``0..total-1``."""
    first = block - window // 2
    return range(max(0, first), min(total, first + window))


@dataclass
class Trace:
    """Causal trace of one fact: for each kind, the target's probability with one state restored."""

    prompt: str
    subject: str
    tokens: list[str]  # [T]
    subject_span: tuple[int, int]  # [start, end) token positions
    target_id: int
    target: str
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, torch.Tensor]  # kind -> [T, n_blocks]; NaN at tokens not traced
    noise_std: float
    """Absolute std of the noise (``noise`` x the embedding std, or the ``std`` given)."""
    samples: int
    seed: int
    window: int

    @property
    def last_subject(self) -> int:
        return self.subject_span[1] - 1

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """``[T, n_blocks]``: restored probability minus the corrupted one."""
        if kind not in self.scores:
            raise InputError(f"no {kind!r} scores in this trace; it has {sorted(self.scores)}")
        return self.scores[kind] - self.corrupted_prob

    def best(self, kind: str) -> tuple[int, int]:
        """``(token, block)`` whose restoration brings back the most (NaN cells ignored)."""
        scores = self.scores[kind].nan_to_num(nan=-1.0)
        flat = int(scores.argmax())
        return flat // scores.shape[1], flat % scores.shape[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": self.tokens,
            "subject_span": list(self.subject_span),
            "last_subject": self.last_subject,
            "target": self.target,
            "target_id": self.target_id,
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "noise_std": self.noise_std,
            "samples": self.samples,
            "seed": self.seed,
            "window": self.window,
            "scores": {kind: probability_rows(values) for kind, values in self.scores.items()},
            "scores_axes": "[token, block]: p(target) with that state restored, mean over noise draws",
        }


def trace_plans(kind: str, positions: Sequence[int], total: int, window: int) -> list[tuple[int, int, Plan]]:
    """``(token, block, plan)`` for every cell of one kind (``mlp_window``: the window centred on the block)."""
    site = kind.removesuffix("_window")
    plans = []
    for block in range(total):
        for token in positions:
            blocks = window_blocks(block, window, total) if kind.endswith("_window") else [block]
            plans.append((token, block, {(site, b): [token] for b in blocks}))
    return plans


def trace_kinds(kinds: Sequence[str], window: int) -> list[str]:
    """The kinds scored: each of ``kinds``, plus the window variant of mlp and attention when ``window > 1``."""
    bad = [kind for kind in kinds if kind not in TRACE_KINDS]
    if bad or not kinds:
        raise InputError(f"unknown trace kinds {bad}; choose from {list(TRACE_KINDS)}")
    if window < 1:
        raise InputError(f"window={window} must be >= 1 (1: no window variants)")
    return [*kinds, *(f"{kind}_window" for kind in kinds if kind in WINDOWED and window > 1)]


@torch.no_grad()
def trace_corruption(
    model: PreTrainedModel,
    corruption: Corruption,
    *,
    kinds: Sequence[str] = TRACE_KINDS,
    window: int = 10,
    positions: Sequence[int] | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> Trace:
    """Every kind's scores ``[T, n_blocks]`` at ``positions`` (default: every token; NaN elsewhere),
    ``batch_size`` corrupted sequences per forward pass."""
    total, n_tok = n_blocks(model), len(corruption.input_ids)
    positions = list(range(n_tok)) if positions is None else list(positions)
    if not positions or any(not 0 <= p < n_tok for p in positions):
        raise InputError(f"positions {positions} must be token positions 0..{n_tok - 1}")
    names = trace_kinds(kinds, window)
    cells = [(kind, *cell) for kind in names for cell in trace_plans(kind, positions, total, window)]
    cells.sort(key=lambda cell: min(block for _, block in cell[3]))  # a pass starts at its first restored block
    per_pass = max(1, batch_size // corruption.samples)
    scores = {kind: torch.full((n_tok, total), torch.nan) for kind in names}
    bar = tqdm(range(0, len(cells), per_pass), desc="causal trace", unit="pass", disable=not progress, leave=False)
    for start in bar:
        chunk = cells[start : start + per_pass]
        for (kind, token, block, _), prob in zip(chunk, corruption.probs(model, [plan for *_, plan in chunk])):
            scores[kind][token, block] = prob
    c = corruption
    return Trace(
        c.prompt, c.subject, c.tokens, c.span, c.target_id, c.target, c.clean_prob, c.corrupted_prob, scores, c.noise_std, c.samples, c.seed, window
    )


def trace_fact(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    subject: str,
    target: str | None = None,
    *,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    kinds: Sequence[str] = TRACE_KINDS,
    window: int = 10,
    std: float | None = None,
) -> Trace:
    """Causal trace of the fact ``prompt`` -> ``target`` (default: the model's top-1 on the clean
    prompt) about ``subject``: every token x block, for each kind and its window variant."""
    trace_kinds(kinds, window)  # a bad kind fails before the clean run
    corruption = corrupt(model, tokenizer, prompt, subject, target, noise=noise, samples=samples, seed=seed, std=std)
    return trace_corruption(model, corruption, kinds=kinds, window=window)


def traceable_facts(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact]) -> tuple[list[Fact], dict[str, str]]:
    """The facts whose subject starts and ends on token boundaries of their prompt (tracing noises
    exactly the subject's tokens, ROME reads the key at its last token), and the others by id, with why."""
    kept, skipped = [], {}
    for fact in facts:
        try:
            subject_span(tokenizer, fact.text(), fact.subject)
        except InputError as err:
            skipped[fact.id] = str(err)
            continue
        kept.append(fact)
    return kept, skipped


def trace_facts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    count: int,
    *,
    kinds: Sequence[str] = ("mlp",),
    window: int = 1,
    samples: int = 3,
    seed: int = 0,
    noise: float = 3.0,
    positions: Literal["last_subject", "both"] = "last_subject",
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[list[Trace], dict[str, str]]:
    """Trace ``count`` of ``facts`` (evenly spaced, so every relation gets its share) for their true
    object, at the last subject token (``positions="both"``: and the last token); facts whose subject
    does not sit on token boundaries are skipped, returned by id with why."""
    if positions not in ("last_subject", "both"):
        raise InputError(f"positions={positions!r}: trace at 'last_subject' or 'both' (last subject token and last token)")
    trace_kinds(kinds, window)  # a bad kind fails before any model run
    chosen, skipped = traceable_facts(tokenizer, evenly_spaced(facts, count))
    traces = []
    for fact in tqdm(chosen, desc="tracing facts", unit="fact", disable=not progress):
        c = corrupt(model, tokenizer, fact.text(), fact.subject, fact.target_true, noise=noise, samples=samples, seed=seed)
        at = [c.last_subject] if positions == "last_subject" else sorted({c.last_subject, len(c.input_ids) - 1})
        traces.append(trace_corruption(model, c, kinds=kinds, window=window, positions=at, batch_size=batch_size, progress=False))
    return traces, skipped


def mean_effect(traces: Sequence[Trace], kind: str, at: str = "last_subject") -> torch.Tensor:
    """``[n_blocks]``: the indirect effect at each trace's last subject token (``at="last"``: its last
    token), averaged over the traces."""
    if not traces:
        raise InputError("no traces to average: trace at least one fact")
    if at not in ("last_subject", "last"):
        raise InputError(f"at={at!r}: read the effect at 'last_subject' or 'last'")
    rows = [t.indirect_effect(kind)[t.last_subject if at == "last_subject" else -1] for t in traces]  # [n_blocks] each
    return torch.stack(rows).mean(0)


def mean_effect_at_last_subject(traces: Sequence[Trace], kind: str) -> torch.Tensor:
    """``[n_blocks]``: the mean indirect effect at the last subject token; its argmax is where ROME edits."""
    return mean_effect(traces, kind, "last_subject")


@dataclass
class LensReading:
    """The lens' reading of the target at every layer of one run, at one token (mean over noise draws)."""

    run: str
    position: int
    token: str
    prob: list[float]  # [L+1] lens p(target), mean over draws
    top1: list[str]  # [L+1] lens top-1 of the mean distribution
    target_top1: list[bool]  # [L+1]

    @property
    def top1_from(self) -> int | None:
        """First layer from which the target is the lens' top-1 at every later layer (None: not at the end)."""
        if not self.target_top1[-1]:
            return None
        layer = len(self.target_top1)
        while layer > 0 and self.target_top1[layer - 1]:
            layer -= 1
        return layer

    @property
    def first_top1(self) -> int | None:
        """First layer where the target is the lens' top-1 at all (None: nowhere)."""
        return next((layer for layer, hit in enumerate(self.target_top1) if hit), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run, "position": self.position, "token": self.token, "prob": self.prob, "top1": self.top1,
            "top1_from": self.top1_from, "first_top1": self.first_top1,
        }


@torch.no_grad()
def read_runs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lens: Lens,
    corruption: Corruption,
    runs: dict[str, Plan | None],
    positions: Sequence[int],
) -> list[LensReading]:
    """Read each run (``None``: the clean prompt; a plan: the corrupted one with those states restored)
    through ``lens`` at ``positions``: p(target) and the top-1 at every layer."""
    unembed, readings = Unembed(model), []
    for name, plan in runs.items():
        with ExitStack() as stack:
            if plan is None:
                ids = corruption.input_ids[None].to(model.device)  # [1, T]
            else:
                ids = stack.enter_context(corruption.applied(model, [plan]))  # [S, T]
            store = stack.enter_context(record_residuals(model))
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        residuals = torch.stack(store)  # [L+1, B, T, d]
        readings += [
            reading_at(tokenizer, lens, unembed, residuals, position, corruption.target_id, name, corruption.tokens[position])
            for position in positions
        ]
    return readings


def reading_at(
    tokenizer: PreTrainedTokenizerBase, lens: Lens, unembed: Unembed, residuals: torch.Tensor, position: int, target_id: int, run: str, token: str
) -> LensReading:
    """The lens' p(target) (mean over the batch) and top-1 of that mean at every layer, at ``position``
    of ``residuals`` ``[L+1, B, T, d]``."""
    probs = torch.stack(
        [unembed(lens.translate_layer(h[:, position].float(), layer)).float().softmax(-1).mean(0) for layer, h in enumerate(residuals)]
    )  # [L+1, V]
    top = probs.argmax(-1)  # [L+1]
    return LensReading(
        run, position, token, [round(float(p), 6) for p in probs[:, target_id]],
        [token_label(tokenizer, int(t)) for t in top], [bool(t == target_id) for t in top],
    )
