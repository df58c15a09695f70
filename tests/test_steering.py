"""Steering (ActAdd, steering vectors) on tiny random models of each family."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_cached_decoding_matches_full_passes, make_model
from lens.artifacts.registry import load_lens
from lens.interventions import ActAdd, LayerProgram, SteeringVector, compose, hook_count
from lens.core.residuals import capture_residuals

PAIRS = [("Love and calm", "Hate")]


def ids_for(tokenizer, text: str = "The quick brown fox jumps over the lazy dog") -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids  # [1, T]


def test_coefficient_zero_is_bit_identical(tiny_model, tokenizer):
    ids = ids_for(tokenizer)
    base = tiny_model(ids).logits
    with ActAdd(tiny_model, tokenizer, PAIRS, layer=1, coefficient=0.0):
        steered = tiny_model(ids).logits
    assert torch.equal(base, steered)
    vec = SteeringVector(torch.randn(tiny_model.config.hidden_size), layer=2, coefficient=0.0)
    with vec.applied(tiny_model):
        assert torch.equal(base, tiny_model(ids).logits)
    assert hook_count(tiny_model) == 0


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_residuals_before_layer_identical_after_differ(tiny_model, tokenizer, layer):
    ids = ids_for(tokenizer)
    base, base_logits = capture_residuals(tiny_model, ids)  # [L+1, 1, T, d]
    with ActAdd(tiny_model, tokenizer, PAIRS, layer=layer, coefficient=4.0) as steer:
        steered, steered_logits = capture_residuals(tiny_model, ids)
    k = steer.steering.shape[0]
    assert torch.equal(base[:layer], steered[:layer])
    for later in range(layer, base.shape[0]):
        assert not torch.allclose(base[later, :, :k], steered[later, :, :k])
    # at the injection layer, exactly the steering tensor was added to the first k positions
    torch.testing.assert_close(steered[layer, 0, :k] - base[layer, 0, :k], steer.steering, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered[layer, 0, k:], base[layer, 0, k:])
    assert not torch.allclose(base_logits, steered_logits)


def test_actadd_tensor_follows_the_recipe(tokenizer):
    model = make_model("llama")
    plus, minus = tokenizer("Love and calm").input_ids, tokenizer("Hate").input_ids
    assert len(plus) > len(minus)
    space = tokenizer.encode(" ", add_special_tokens=False)[0]
    padded = minus + [space] * (len(plus) - len(minus))
    res, _ = capture_residuals(model, torch.tensor([plus, padded]))
    with ActAdd(model, tokenizer, PAIRS + [("Anger", "Calm")], layer=2, coefficient=3.0) as steer:
        pass
    a, c = tokenizer("Anger").input_ids, tokenizer("Calm").input_ids
    width = max(len(a), len(c))
    res2, _ = capture_residuals(model, torch.tensor([a + [space] * (width - len(a)), c + [space] * (width - len(c))]))
    expected = 3.0 * (res[2, 0] - res[2, 1])
    expected[: res2.shape[2]] += 3.0 * (res2[2, 0] - res2[2, 1])
    torch.testing.assert_close(steer.steering, expected)


@pytest.mark.parametrize("prompt", ["The quick brown fox jumps", "Lo"])
def test_cached_generation_matches_uncached(tiny_model, tokenizer, prompt):
    ids = ids_for(tokenizer, prompt)  # "Lo" is shorter than the steering: decode steps inside it are steered
    plain = tiny_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with ActAdd(tiny_model, tokenizer, [("Packages are installed with apt", "Love")], layer=1, coefficient=6.0):
        cached = assert_cached_decoding_matches_full_passes(tiny_model, ids, max_new_tokens=8)
    assert not torch.equal(cached, plain), "steering this strong should change a greedy continuation"
    assert hook_count(tiny_model) == 0


def test_steering_vector_cached_generation(tiny_model, tokenizer):
    ids = ids_for(tokenizer, "The server")
    vec = SteeringVector.from_contrast(tiny_model, tokenizer, ["Love", "calm"], ["Hate", "anger"], layer=1)
    vec.coefficient = 8.0
    with vec.applied(tiny_model):
        assert_cached_decoding_matches_full_passes(tiny_model, ids, max_new_tokens=6)


def test_steering_vector_positions_and_methods(tokenizer, tmp_path):
    model = make_model("gpt2")
    pos, neg = ["Love and calm", "calm"], ["Hate", "anger and hate"]
    mean = SteeringVector.from_contrast(model, tokenizer, pos, neg, layer=2)
    reads = [capture_residuals(model, ids_for(tokenizer, p))[0][2, 0, -1] for p in pos + neg]
    torch.testing.assert_close(mean.vector, (reads[0] + reads[1]) / 2 - (reads[2] + reads[3]) / 2)
    pca = SteeringVector.from_contrast(model, tokenizer, pos, neg, layer=2, method="pca")
    assert pca.vector @ mean.vector > 0 and pca.metadata["method"] == "pca"

    ids = ids_for(tokenizer)
    base, _ = capture_residuals(model, ids)
    vec = SteeringVector(mean.vector, layer=2, coefficient=2.0, min_token_index=3, metadata=mean.metadata, built_for=mean.built_for)
    with vec.applied(model):
        steered, _ = capture_residuals(model, ids)
    torch.testing.assert_close(steered[2, 0, :3], base[2, 0, :3])
    torch.testing.assert_close(steered[2, 0, 3:] - base[2, 0, 3:], (2.0 * mean.vector).expand(ids.shape[1] - 3, -1))

    path = vec.save(tmp_path / "love")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "vector.safetensors"]
    loaded = SteeringVector.load(path, model=model)
    assert torch.equal(loaded.vector, vec.vector)
    assert (loaded.layer, loaded.coefficient, loaded.min_token_index) == (2, 2.0, 3)
    assert loaded.metadata["positives"] == pos and loaded.metadata["method"] == "mean"
    with pytest.raises(ValueError, match=r"made for gpt2 \(unembedding sha256 .*but llama has"):
        SteeringVector.load(path, model=make_model("llama"))
    with pytest.raises(ValueError, match="blocks: 3 vs model 4"):
        SteeringVector.load(path, model=make_model("gpt2", n_layers=4))
    with pytest.raises(ValueError, match="holds a steering_vector, not a tuned_lens"):
        load_lens(path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "vector.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        SteeringVector.load(tmp_path / "junk")
    (tmp_path / "junk" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="corrupt or truncated"):
        SteeringVector.load(tmp_path / "junk")


def test_hooks_removed_after_exception(tiny_model, tokenizer):
    ids = ids_for(tokenizer)
    base = tiny_model(ids).logits
    blocks_before = list(tiny_model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with compose(LayerProgram.skip(tiny_model, 0, 1), ActAdd(tiny_model, tokenizer, PAIRS, layer=2, coefficient=5.0)):
            assert hook_count(tiny_model) == 1 and tiny_model.config.num_hidden_layers == 2
            raise RuntimeError("boom")
    assert hook_count(tiny_model) == 0
    assert list(tiny_model.modules()) == blocks_before
    assert torch.equal(tiny_model(ids).logits, base)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer=4), r"layer 4 out of range.*valid layers are 0\.\.3"),
        (dict(layer=-1), r"layer -1 out of range"),
        (dict(coefficient=math.nan), "coefficient nan is not a finite number"),
        (dict(coefficient=math.inf), "coefficient inf is not a finite number"),
        (dict(pairs=[("", "Hate")]), "empty prompt ''"),
        (dict(pairs=[("Love", "<|endoftext|>")]), "tokenizes to nothing but special tokens"),
        (dict(pairs=[]), "at least one"),
    ],
)
def test_actadd_bad_input(tokenizer, kwargs, message):
    model = make_model("gpt2")
    args = dict(pairs=PAIRS, layer=1, coefficient=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        ActAdd(model, tokenizer, **args)
    assert hook_count(model) == 0


def test_steering_vector_bad_input(tokenizer):
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"shape \(7,\).*width 32"):
        SteeringVector(torch.ones(7), layer=1).applied(model)
    with pytest.raises(ValueError, match="coefficient inf"):
        SteeringVector(torch.ones(32), layer=1, coefficient=math.inf).applied(model)
    with pytest.raises(ValueError, match=r"layer 9 out of range.*0\.\.3"):
        SteeringVector(torch.ones(32), layer=9).applied(model)
    with pytest.raises(ValueError, match=r"token_index 5 out of range"):
        SteeringVector.from_contrast(model, tokenizer, ["Love"], ["Hate"], layer=1, token_index=5)
    with pytest.raises(ValueError, match="method must be 'mean' or 'pca'"):
        SteeringVector.from_contrast(model, tokenizer, ["Love"], ["Hate"], layer=1, method="median")
    with pytest.raises(ValueError, match="needs equal counts of at least 2"):
        SteeringVector.from_contrast(model, tokenizer, ["Love"], ["Hate"], layer=1, method="pca")
    assert hook_count(model) == 0
