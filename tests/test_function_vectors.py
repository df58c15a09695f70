"""Function vectors on the tiny models: head contributions, head patching, indirect effects, the
vector's injection, the word lists, and the run end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import make_model, make_tokenizer
from lens.analysis.function_vectors import (
    final_logits,
    final_token_add,
    function_vector,
    head_contributions,
    head_means,
    indirect_effects,
    length_batches,
    make_prompts,
    patched_heads,
    study_function_vector,
    top_heads,
)
from lens.cli import main
from lens.config import InputError
from lens.core.arch import get_component
from lens.core.components import record_sites
from lens.core.residuals import capture_residuals
from lens.core.translators import logit_lens_for
from lens.data.tasks import TASK_NAMES, MIN_PAIRS, format_prompt, load_task, parse_task, split_task
from lens.interventions import hook_count

WORDS = [
    ("quick", "brown"), ("fox", "jumps"), ("lazy", "dog"), ("lens", "reads"), ("apt", "purge"), ("server", "starts"),
    ("love", "hate"), ("anger", "calm"), ("over", "the"), ("boot", "time"), ("steering", "vector"), ("residual", "stream"),
]


def prompts_for(tokenizer, shots: int = 3, n: int = 4, shuffle: bool = False, seed: int = 0):
    rng = random.Random(seed)
    return make_prompts(tokenizer, WORDS, WORDS[:n], shots, rng, shuffle_labels=shuffle)


def answer_prob(model, prompt) -> float:
    return float(final_logits(model, [prompt]).softmax(-1)[0, prompt.answer])


def test_shipped_word_lists_validate_and_split_disjointly():
    for name in TASK_NAMES:
        task = load_task(name)
        assert len(task.pairs) >= 60 and "written for" in task.source.lower()
        split = split_task(task, 0.2, 0.4, seed=3)
        parts = [set(split.train), set(split.val), set(split.test)]
        assert sum(map(len, parts)) == len(task.pairs) and set().union(*parts) == set(task.pairs)
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert split == split_task(task, 0.2, 0.4, seed=3) != split_task(task, 0.2, 0.4, seed=4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["pairs"].__setitem__(2, ["hot", "cold", "warm"]), "pair 2"),
        (lambda d: d["pairs"].__setitem__(3, ["hot", " cold"]), "spaces at either end"),
        (lambda d: d["pairs"].append(list(d["pairs"][0])), "appears in pairs 0 and"),
        (lambda d: d.__setitem__("pairs", d["pairs"][: MIN_PAIRS - 1]), f"need at least {MIN_PAIRS}"),
        (lambda d: d.pop("source"), "'source'"),
        (lambda d: d.__setitem__("pairs", {"hot": "cold"}), "must be a list"),
    ],
)
def test_a_broken_word_list_fails_naming_the_problem(tmp_path, change, message):
    data = json.loads(json.dumps({"task": "t", "description": "d", "source": "written for a test", "pairs": [[f"w{i}", f"v{i}"] for i in range(30)]}))
    parse_task(data, "ok.json")  # the unbroken list is fine
    change(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message) as err:
        load_task(path)
    assert str(path) in str(err.value)


def test_missing_or_invalid_task_files_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="antonyms"):
        load_task(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid UTF-8 JSON"):
        load_task(tmp_path / "bad.json")


def test_prompts_hold_shots_without_the_query_and_shuffled_labels_stay_the_same_words(tokenizer):
    assert format_prompt([("hot", "cold"), ("big", "small")], "fast") == "hot: cold\nbig: small\nfast:"
    assert format_prompt([], "fast") == "fast:"
    for shuffle in (False, True):
        for prompt, (query, _) in zip(prompts_for(tokenizer, shots=5, shuffle=shuffle), WORDS):
            lines = prompt.text.split("\n")
            assert len(lines) == 6 and lines[-1] == f"{query}:" and all(not line.startswith(f"{query}:") for line in lines[:-1])
    answer = dict(WORDS)
    for shuffle in (False, True):
        demos = [[line.split(": ") for line in p.text.split("\n")[:-1]] for p in prompts_for(tokenizer, 5, 4, shuffle, seed=1)]
        # shuffled labels: the same outputs, given to other inputs
        assert all(sorted(y for _, y in d) == sorted(answer[x] for x, _ in d) for d in demos)
        assert all(y == answer[x] for d in demos for x, y in d) != shuffle


def test_heads_through_the_output_projection_sum_to_the_attention_output(family, tokenizer):
    model = make_model(family)
    ids = torch.tensor([prompts_for(tokenizer)[0].ids])
    with record_sites(model, ("heads", "attention")) as store:
        model(input_ids=ids, use_cache=False)
    for block in range(len(store["heads"])):
        per_head = head_contributions(model, block, store["heads"][block])  # [1, T, H, d]
        bias = get_component(model, block, "attention_out").bias
        total = per_head.sum(-2) + (0 if bias is None else bias)
        torch.testing.assert_close(total, store["attention"][block], atol=1e-5, rtol=1e-5)
        assert per_head.abs().sum((0, 1, 3)).min() > 0  # every head contributes something


def test_patching_a_head_with_its_own_output_changes_nothing_and_anything_else_changes_only_the_final_token(family, tokenizer):
    model = make_model(family)
    prompt = prompts_for(tokenizer)[0]
    ids = torch.tensor([prompt.ids])
    own = head_means(model, [prompt])  # one prompt: its own head outputs at the final token
    plain = model(input_ids=ids, use_cache=False).logits
    with patched_heads(model, [(1, 2)], own):
        same = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=0)
    with patched_heads(model, [(1, 2)], own + 1.0):
        moved = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(moved[:, :-1], plain[:, :-1], atol=1e-6, rtol=0)
    assert (moved[:, -1] - plain[:, -1]).abs().max() > 1e-3
    assert hook_count(model) == 0


def test_patched_heads_patch_only_their_own_batch_row(tokenizer):
    model = make_model("llama")
    ids = torch.tensor([prompts_for(tokenizer)[0].ids] * 3)
    means = head_means(model, prompts_for(tokenizer)[1:])
    plain = model(input_ids=ids, use_cache=False).logits[:, -1]
    with patched_heads(model, [None, (0, 1), (2, 3)], means):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(logits[0], plain[0], atol=1e-6, rtol=0)
    single = []
    for head in [(0, 1), (2, 3)]:
        with patched_heads(model, [head], means):
            single.append(model(input_ids=ids[:1], use_cache=False).logits[0, -1])
    torch.testing.assert_close(logits[1:], torch.stack(single), atol=1e-5, rtol=1e-5)


def test_aie_is_zero_when_the_corrupted_prompts_are_the_clean_ones(family, tokenizer):
    model = make_model(family)
    prompt = prompts_for(tokenizer)[0]
    effects = indirect_effects(model, [prompt], head_means(model, [prompt]))
    assert effects.shape == (1, 3, 4) and effects.abs().max() < 1e-6
    other = indirect_effects(model, [prompt], head_means(model, prompts_for(tokenizer)[1:]))
    assert other.abs().max() > 1e-5


def test_indirect_effects_from_the_cached_prefix_equal_full_patched_runs(family, tokenizer):
    """The single-token step on the prefix cache, many heads per batch, gives what patching one head in
    a full run gives."""
    model = make_model(family)
    corrupted = prompts_for(tokenizer, shuffle=True)[:2]
    means = head_means(model, prompts_for(tokenizer, seed=5))
    effects = indirect_effects(model, corrupted, means, head_batch=5)
    for p, prompt in enumerate(corrupted):
        base = answer_prob(model, prompt)
        for block, head in [(0, 0), (1, 3), (2, 1)]:
            with patched_heads(model, [(block, head)], means):
                patched = answer_prob(model, prompt)
            assert effects[p, block, head].item() == pytest.approx(patched - base, abs=1e-6)
    assert hook_count(model) == 0


def test_function_vector_is_the_heads_output_projection_without_bias(family, tokenizer):
    model = make_model(family)
    means = head_means(model, prompts_for(tokenizer))
    heads = [(0, 1), (2, 3), (2, 0)]
    expected = torch.zeros(model.config.hidden_size)
    hd = means.shape[-1]
    for block, head in heads:
        proj = get_component(model, block, "attention_out")
        x = torch.zeros(means.shape[1] * hd)
        x[head * hd : (head + 1) * hd] = means[block, head]
        expected += proj(x[None])[0] - (0 if proj.bias is None else proj.bias)
    torch.testing.assert_close(function_vector(model, means, heads), expected, atol=1e-5, rtol=1e-5)


def test_top_heads_are_the_largest_aie_and_k_is_checked():
    aie = torch.tensor([[0.1, -0.2, 0.0], [0.5, 0.3, -0.1]])
    assert top_heads(aie, 3) == [(1, 0), (1, 1), (0, 0)]
    with pytest.raises(InputError, match="choose 1..6"):
        top_heads(aie, 7)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_the_vector_moves_only_the_final_token_residual_and_by_exactly_itself(family, tokenizer, layer):
    model = make_model(family)
    ids = torch.tensor([prompts_for(tokenizer)[0].ids] * 2)  # [2, T]
    vector = torch.randn(model.config.hidden_size)
    plain, _ = capture_residuals(model, ids)
    with final_token_add(model, layer, vector, ids.shape[1]):
        steered, logits = capture_residuals(model, ids)
    torch.testing.assert_close(steered[layer, :, -1] - plain[layer, :, -1], vector.expand(2, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steered[:, :, :-1], plain[:, :, :-1], atol=1e-5, rtol=1e-5)  # every layer, earlier tokens
    torch.testing.assert_close(steered[:layer], plain[:layer], atol=1e-6, rtol=0)  # layers below the injection
    if layer < 3:
        assert (steered[-1, :, -1] - plain[-1, :, -1]).abs().max() > 1e-3
    assert hook_count(model) == 0


def test_prompts_are_batched_by_length_without_padding_and_batching_changes_nothing(tokenizer):
    model = make_model("gpt2")
    prompts = make_prompts(tokenizer, WORDS, WORDS, 2, random.Random(0))
    seen = []
    for indices, ids in length_batches(prompts, batch_size=3):
        assert ids.shape == (len(indices), len(prompts[indices[0]].ids)) and len(indices) <= 3
        assert ids.tolist() == [list(prompts[i].ids) for i in indices]
        seen += indices
    assert sorted(seen) == list(range(len(prompts)))
    vector = torch.randn(model.config.hidden_size)
    together = final_logits(model, prompts, 1, vector, batch_size=32)
    alone = torch.cat([final_logits(model, [p], 1, vector) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_study_end_to_end_on_a_tiny_model(tokenizer):
    model = make_model("llama")
    task = parse_task({"task": "t", "description": "d", "source": "test", "pairs": [list(p) for p in WORDS] + [[f"x{i}", f"y{i}"] for i in range(10)]}, "t")
    split = split_task(task, 0.25, 0.25, seed=0)
    study = study_function_vector(model, tokenizer, logit_lens_for(model), split, "t", shots=2, mean_prompts=4, aie_prompts=3, k=3, seed=0)
    assert len(study.heads) == 3 and study.aie.shape == (3, 4)
    assert [study.aie[h].item() for h in study.heads] == sorted(study.aie.flatten().tolist(), reverse=True)[:3]
    assert study.layers == [0, 1, 2, 3] and study.layer in study.layers
    assert study.val_accuracy[study.layers.index(study.layer)] == max(study.val_accuracy)
    assert study.zero_shot.before.n == len(split.test) and len(study.reading_after.prob) == 4
    # the lens reads the model's own output at the last layer, so its top-1 count there is the model's accuracy
    assert study.reading_before.top1[-1] == pytest.approx(study.zero_shot.before.mean)
    assert study.reading_after.top1[-1] == pytest.approx(study.zero_shot.after.mean)
    json.dumps(study.to_json())
    assert hook_count(model) == 0


def test_the_command_writes_figures_summary_and_vector(tmp_path, capsys):
    folder = tmp_path / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    main(["function-vector", f"model.name={folder}", f"output_dir={tmp_path}", "run_name=fv", "lens=logit", "task=plural_singular",
          "shots=3", "mean_prompts=3", "aie_prompts=2", "top_heads=2", "layers=[1,2]"])
    out = tmp_path / "fv"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] in (1, 2) and len(summary["heads"]) == 2 and summary["config"]["task"] == "plural_singular"
    assert (out / "fv_aie.png").stat().st_size > 0 and (out / "fv_layers.png").stat().st_size > 0
    assert (out / "vector" / "config.json").is_file()
    assert "zero-shot test accuracy" in capsys.readouterr().out


def test_bad_config_fails_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["function-vector", "task=synonyms", f"output_dir={tmp_path}"])
    assert "antonyms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["function-vector", "val_fraction=0.5", "test_fraction=0.5", f"output_dir={tmp_path}"])
    assert "below 1" in capsys.readouterr().err


def test_hooks_are_gone_after_an_error_inside_or_a_wrong_batch(tokenizer):
    model = make_model("gpt2")
    prompt = prompts_for(tokenizer)[0]
    means = head_means(model, [prompt])
    with pytest.raises(RuntimeError, match="inside"):
        with patched_heads(model, [(0, 0)], means):
            raise RuntimeError("inside")
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match="2 rows for 1 patch rows"):
        with patched_heads(model, [(0, 0)], means):
            model(input_ids=torch.tensor([prompt.ids] * 2), use_cache=False)
    assert hook_count(model) == 0
