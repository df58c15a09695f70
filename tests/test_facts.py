"""The fact set: the shipped file is well formed, bad files fail naming the fix, and the known-fact
filter is the model's own greedy answer, batched or not."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict

import pytest
import torch

from conftest import TEXT, clear_argmax
from lens.analysis.known_facts import first_token, greedy_next_tokens, known_facts
from lens.config import InputError
from lens.data.facts import Fact, load_facts, mentions

RELATIONS = {
    "capital of", "city of landmark", "country of city", "main language", "country of company",
    "continent", "currency", "country of birth", "sport", "colour",
}


@pytest.fixture(scope="module")
def shipped() -> list[Fact]:
    return load_facts()


def test_shipped_set_has_enough_facts_of_every_relation(shipped):
    assert 250 <= len(shipped) <= 350
    counts = Counter(fact.relation for fact in shipped)
    assert set(counts) == RELATIONS
    assert min(counts.values()) >= 15, counts
    assert len({fact.id for fact in shipped}) == len(shipped)


def test_shipped_facts_are_well_formed(shipped):
    for fact in shipped:
        assert fact.target_true.startswith(" ") and fact.target_new.startswith(" "), fact.id
        assert fact.target_true.split()[0] != fact.target_new.split()[0], f"{fact.id}: the targets share their first word"
        assert 2 <= len(fact.paraphrases) <= 3 and 2 <= len(fact.neighbourhood) <= 3, fact.id
        assert not any(mentions(text, fact.subject) for text in fact.neighbourhood), fact.id
        assert all(mentions(text, fact.subject) for text in fact.paraphrases), fact.id
        assert fact.subject in fact.text() and "{}" not in fact.text() and fact.text() == fact.text().rstrip()
        assert "written for this project" in fact.source and "Wikidata P" in fact.source, fact.id
    assert len({fact.text() for fact in shipped}) == len(shipped), "two facts ask the same prompt"


def test_neighbourhood_prompts_are_true_of_the_same_object(shipped):
    """Every neighbourhood prompt is the prompt of another shipped fact, whose object is the same."""
    by_text = {fact.text(): fact for fact in shipped}
    for fact in shipped:
        for text in fact.neighbourhood:
            other = by_text.get(text)
            assert other is not None, f"{fact.id}: neighbourhood prompt {text!r} is no fact's prompt"
            assert other.id != fact.id and other.target_true == fact.target_true, (fact.id, other.id)


GOOD = dict(
    id="capital-x", relation="capital of", subject="Xland", prompt="The capital of {} is", target_true=" Xton",
    target_new=" Yton", paraphrases=["Xland's capital is"], neighbourhood=["You can visit the X Tower in the city of"],
    source="made up for a test",
)


def write_rows(path, *rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")


def test_a_good_file_round_trips(tmp_path):
    path = tmp_path / "facts.jsonl"
    write_rows(path, GOOD, "", dict(GOOD, id="capital-y"))
    facts = load_facts(path)
    assert [fact.id for fact in facts] == ["capital-x", "capital-y"]
    assert facts[0].text() == "The capital of Xland is"
    assert facts[0].paraphrases == ("Xland's capital is",)  # lists become tuples
    assert asdict(facts[0]) == dict(GOOD, paraphrases=("Xland's capital is",), neighbourhood=tuple(GOOD["neighbourhood"]))


BAD = [
    ({k: v for k, v in GOOD.items() if k != "source"}, "missing source"),
    (dict(GOOD, colour="red"), "unknown colour"),
    (dict(GOOD, prompt="The capital of Xland is"), "exactly one '{}'"),
    (dict(GOOD, prompt="{} and {} are"), "exactly one '{}'"),
    (dict(GOOD, prompt="The {0} of {} is"), "exactly one '{}'"),
    (dict(GOOD, target_new=" Xton"), "target_new ' Xton' equals target_true"),
    (dict(GOOD, target_true=""), "target_true must be a non-empty string"),
    (dict(GOOD, paraphrases=[]), "paraphrases must be a non-empty list"),
    (dict(GOOD, neighbourhood=[]), "neighbourhood must be a non-empty list"),
    (dict(GOOD, neighbourhood="The capital of Yland is"), "neighbourhood must be a non-empty list"),
    (dict(GOOD, paraphrases=["The capital city is"]), "does not mention the subject 'Xland'"),
    (dict(GOOD, neighbourhood=["The largest city of xland is"]), "mentions the subject 'Xland'"),
    (["not", "an", "object"], "must be a JSON object"),
]


@pytest.mark.parametrize("row, message", BAD, ids=[message for _, message in BAD])
def test_a_bad_fact_fails_naming_its_line_and_the_fix(tmp_path, row, message):
    path = tmp_path / "facts.jsonl"
    write_rows(path, dict(GOOD, id="fine"), row)
    with pytest.raises(InputError) as err:
        load_facts(path)
    assert message in str(err.value) and f"{path}, line 2" in str(err.value)


@pytest.mark.parametrize(
    "rows, message",
    [
        ((GOOD, '{"id": "broken",'), "line 2: not valid JSON"),
        ((GOOD, dict(GOOD, relation="other")), "line 2: duplicate id 'capital-x' (first on line 1)"),
        (("",), "holds no facts"),
    ],
)
def test_a_bad_file_fails_naming_the_fix(tmp_path, rows, message):
    path = tmp_path / "facts.jsonl"
    write_rows(path, *rows)
    with pytest.raises(InputError) as err:
        load_facts(path)
    assert message in str(err.value)


def test_a_missing_file_fails_naming_the_fix(tmp_path):
    with pytest.raises(InputError, match="does not exist: give a .jsonl file of facts, or None"):
        load_facts(tmp_path / "nope.jsonl")


def test_facts_built_in_code_are_checked_too():
    with pytest.raises(InputError, match="exactly one"):
        Fact(**dict(GOOD, prompt="no slot", paraphrases=("Xland",), neighbourhood=("Y",)))


# The known-fact filter on tiny random models.

def tiny_prompts() -> list[tuple[str, str]]:
    """``(subject, template)`` pairs of many token lengths, cut from the conftest text."""
    words = TEXT.split()[:60]
    return [(" ".join(words[i : i + 2]), "{} " + " ".join(words[i + 2 : i + 2 + n])) for i in range(0, 40, 3) for n in (1, 3, 6)]


def fact_for(subject: str, template: str, target: str, index: int) -> Fact:
    return Fact(
        id=f"tiny-{index}", relation="test", subject=subject, prompt=template, target_true=target,
        target_new=" zzz" if target.strip() != "zzz" else " qqq", paraphrases=(f"Say {subject}",),
        neighbourhood=("Nothing here",), source="built from the tiny model's own predictions",
    )


@torch.no_grad()
def one_at_a_time(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """``[N, V]``: the last-position logits of each prompt, run alone."""
    return torch.stack([model(input_ids=torch.tensor([tokenizer(p)["input_ids"]])).logits[0, -1] for p in prompts])


def test_batched_greedy_tokens_equal_one_prompt_at_a_time(tiny_model, tokenizer):
    pairs = tiny_prompts()
    prompts = [template.format(subject) for subject, template in pairs]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) >= 4, "the test needs prompts of several lengths"
    reference = one_at_a_time(tiny_model, tokenizer, prompts)  # [N, V]
    clear = clear_argmax(reference)
    assert clear.float().mean() > 0.8
    for batch_size in (5, 64):  # 64: every length in one call, so padding (if any) would show
        got = torch.tensor(greedy_next_tokens(tiny_model, tokenizer, prompts, batch_size))
        assert torch.equal(got[clear], reference.argmax(-1)[clear]), batch_size


def test_known_facts_keeps_the_models_own_answers_and_drops_others(tiny_model, tokenizer):
    pairs = tiny_prompts()
    reference = one_at_a_time(tiny_model, tokenizer, [t.format(s) for s, t in pairs])  # [N, V]

    def as_target(token: int) -> str | None:
        """The token's text, where it is a valid target that encodes back to the same first token."""
        text = tokenizer.decode([token])
        return text if text.strip() and first_token(tokenizer, text) == token else None

    keep, drop = [], []
    for index, ((subject, template), logits) in enumerate(zip(pairs, reference)):
        greedy, runner_up = logits.topk(2).indices.tolist()
        target, other = as_target(greedy), as_target(runner_up)
        if not clear_argmax(logits) or target is None or other is None or target.strip() == other.strip():
            continue
        keep.append(fact_for(subject, template, target, 2 * index))
        drop.append(fact_for(subject, template, other, 2 * index + 1))  # the runner-up: close, but not the answer
    assert len(keep) >= 10
    facts = [fact for pair in zip(keep, drop) for fact in pair]
    assert known_facts(tiny_model, tokenizer, facts, batch_size=4) == keep


def test_known_facts_refuses_a_bad_batch_size(tokenizer):
    with pytest.raises(InputError, match="batch_size must be at least 1"):
        greedy_next_tokens(None, tokenizer, ["a"], batch_size=0)
