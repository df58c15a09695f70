"""How well a fact edit works and what it costs (the CounterFact scores of Meng et al. 2022).

Every score compares the log-probability of the *whole* token sequence of the new object with that
of the true object after a prompt, before and after the edit (one edit per fact, restored between):

- efficacy: the new object wins on the edit prompt (a rate over facts, Wilson interval);
- paraphrase generalisation: the share of the fact's paraphrases where the new object wins;
- neighbourhood specificity: the share of prompts about other subjects with the same true object
  where the true object still wins (both per fact, Student-t interval over facts: prompts of one
  fact are not independent);
- magnitudes: mean P(new) − P(true) (neighbourhood: P(true) − P(new));
- fluency: the held-out corpus log-prob change per token of each edit (t interval over edits) and
  the perplexity ratio it implies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.intervention_eval import Interval, mean_difference_ci, per_sequence_shift, sequence_logprobs, wilson_interval
from lens.analysis.picture import InterventionFactory, token_label
from lens.analysis.rome import right_padded
from lens.analysis.tracing import LensReading, reading_at
from lens.config import InputError
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed
from lens.data.facts import Fact


@torch.no_grad()
def object_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], objects: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """``[N]``: log P(object's tokens | prompt), summed over the object's tokens, for each pair."""
    rows, spans = [], []
    for prompt, obj in zip(prompts, objects, strict=True):
        head, tail = tokenizer(prompt)["input_ids"], tokenizer(obj, add_special_tokens=False)["input_ids"]
        if not tail:
            raise InputError(f"object {obj!r} has no token: name it as it continues the prompt (leading space)")
        rows.append(head + tail)
        spans.append((len(head), tail))
    out = []
    for start in range(0, len(rows), batch_size):
        ids, mask = right_padded(rows[start : start + batch_size], tokenizer, model.device)  # [B, T]
        logp = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)  # [B, T, V]
        for i, (begin, tail) in enumerate(spans[start : start + batch_size]):
            positions = torch.arange(begin - 1, begin - 1 + len(tail), device=logp.device)
            out.append(logp[i, positions, torch.tensor(tail, device=logp.device)].sum())
    return torch.stack(out).cpu()


@dataclass
class FactScores:
    """One fact under one model state."""

    efficacy: bool
    """The new object beats the true one on the edit prompt."""
    magnitude: float
    """P(new) − P(true) on the edit prompt."""
    paraphrase: float
    """Share of paraphrases where the new object wins."""
    paraphrase_magnitude: float
    neighbourhood: float
    """Share of neighbourhood prompts where the true object still wins."""
    neighbourhood_magnitude: float
    """Mean P(true) − P(new) on the neighbourhood prompts."""


def score_fact(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fact: Fact) -> FactScores:
    """The fact's scores under the model as it is hooked or edited right now."""
    prompts = [fact.text(), *fact.paraphrases, *fact.neighbourhood]
    logp = object_logprobs(model, tokenizer, prompts * 2, [fact.target_new] * len(prompts) + [fact.target_true] * len(prompts))
    new, true = logp[: len(prompts)], logp[len(prompts) :]  # [P] each
    wins, gap = new > true, new.exp() - true.exp()
    para = slice(1, 1 + len(fact.paraphrases))
    near = slice(1 + len(fact.paraphrases), None)
    return FactScores(
        bool(wins[0]), float(gap[0]),
        float(wins[para].float().mean()), float(gap[para].mean()),
        float((~wins[near]).float().mean()), float(-gap[near].mean()),
    )


SCORES = ("efficacy", "paraphrase", "neighbourhood", "magnitude", "paraphrase_magnitude", "neighbourhood_magnitude")


def summarise(scores: Sequence[FactScores], confidence: float) -> dict[str, Interval]:
    """Each score over facts with its interval: Wilson for efficacy, Student-t for the rest, cut to
    the score's range (rates 0..1, magnitudes -1..1)."""
    out = {"efficacy": wilson_interval(sum(s.efficacy for s in scores), len(scores), confidence)}
    for name in SCORES[1:]:
        interval = mean_difference_ci(torch.tensor([getattr(s, name) for s in scores]), confidence)
        out[name] = interval.within(-1.0, 1.0) if name.endswith("magnitude") else interval.within(0.0, 1.0)
    return out


@dataclass
class EditEvaluation:
    """Scores of one edit per fact, before vs after, and the fluency cost of the edits."""

    facts: list[str]
    before: dict[str, Interval]
    after: dict[str, Interval]
    fluency: Interval
    """Held-out log-prob change (edited − intact), nats per token; one observation per edit."""
    held_out_sequences: int
    held_out_tokens: int
    per_fact: list[dict[str, Any]] = field(default_factory=list)

    @property
    def perplexity_ratio(self) -> float:
        return math.exp(-self.fluency.mean)

    def by_relation(self) -> dict[str, dict[str, float]]:
        """Per relation: how many facts, and the mean of each score after the edit (few facts each: no intervals)."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in self.per_fact:
            groups.setdefault(record["relation"], []).append(record["after"])
        return {
            relation: {"facts": len(rows), **{name: sum(float(row[name]) for row in rows) / len(rows) for name in ("efficacy", "paraphrase", "neighbourhood")}}
            for relation, rows in groups.items()
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": self.facts,
            "before": {k: v.to_json() for k, v in self.before.items()},
            "after": {k: v.to_json() for k, v in self.after.items()},
            "fluency": {
                "unit": "nats per token",
                "logprob_diff": self.fluency.to_json(),
                "perplexity_ratio": self.perplexity_ratio,
                "held_out_sequences": self.held_out_sequences,
                "held_out_tokens": self.held_out_tokens,
            },
            "by_relation": self.by_relation(),
            "per_fact": self.per_fact,
        }

    def lines(self) -> list[str]:
        def show(ci: Interval, percent: bool) -> str:
            return f"{ci.mean:.1%} [{ci.low:.1%}, {ci.high:.1%}]" if percent else f"{ci.mean:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"

        out = [f"{len(self.facts)} edits, one per fact ({self.before['efficacy'].confidence:.0%} intervals)"]
        for name in SCORES:
            percent = not name.endswith("magnitude")
            out.append(f"  {name}: before {show(self.before[name], percent)}, after {show(self.after[name], percent)}")
        ci = self.fluency
        out.append(
            f"  fluency: held-out log-prob {ci.mean:+.4f} nats/token [{ci.low:+.4f}, {ci.high:+.4f}], perplexity x{self.perplexity_ratio:.4f}"
        )
        for relation, scores in self.by_relation().items():
            out.append(
                f"  {relation} ({scores['facts']} facts) after: efficacy {scores['efficacy']:.0%}, "
                f"paraphrase {scores['paraphrase']:.0%}, neighbourhood {scores['neighbourhood']:.0%}"
            )
        return out


def evaluate_edits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    edit_for: Callable[[Fact], InterventionFactory],
    held_out: Sequence[torch.Tensor],
    confidence: float = 0.95,
) -> EditEvaluation:
    """Edit each fact alone (``edit_for(fact)()`` applied for its scoring, restored after) and score it
    before and after; the fluency cost on ``held_out`` sequences ``[T]`` is measured under every edit."""
    if len(facts) < 2:
        raise InputError(f"scores over facts need at least 2 facts for an interval, got {len(facts)}: edit more known facts")
    base = sequence_logprobs(model, held_out)
    before, after, shifts, per_fact = [], [], [], []
    for fact in tqdm(facts, desc="edits", unit="fact"):
        before.append(score_fact(model, tokenizer, fact))
        make = edit_for(fact)
        with make():
            after.append(score_fact(model, tokenizer, fact))
            shifts.append(float(per_sequence_shift(sequence_logprobs(model, held_out), base).mean()))
        per_fact.append({"id": fact.id, "relation": fact.relation, "before": asdict(before[-1]), "after": asdict(after[-1]), "held_out_logprob_diff": shifts[-1]})
    return EditEvaluation(
        [fact.id for fact in facts],
        summarise(before, confidence),
        summarise(after, confidence),
        mean_difference_ci(torch.tensor(shifts), confidence),
        len(held_out),
        sum(b.numel() for b in base),
        per_fact,
    )


@torch.no_grad()
def lens_readings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lens: Lens, input_ids: torch.Tensor, target_id: int, positions: dict[str, int], run: str
) -> dict[str, LensReading]:
    """The lens' p(target) and top-1 at every layer, at each named position of ``input_ids`` ``[1, T]``,
    under the model as it is now (``run`` names that state)."""
    residuals, _ = capture_residuals(model, input_ids.to(model.device), logits=False)  # [L+1, 1, T, d]
    unembed = Unembed(model)
    return {
        name: reading_at(tokenizer, lens, unembed, residuals, position, target_id, run, token_label(tokenizer, int(input_ids[0, position])))
        for name, position in positions.items()
    }
