"""Layer surgery: programs of blocks match models built with those blocks, caches stay correct."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from conftest import N_LAYERS, assert_cached_decoding_matches_full_passes, make_model
from lens.core.arch import arch_spec, get_blocks
from lens.interventions import LayerProgram, compose, hook_count
from lens.interventions import surgery
from lens.core.model import prepare_model
from lens.core.residuals import capture_residuals
from lens.core.translators import SpanTranslator


def ids_for(tokenizer, text: str = "The quick brown fox jumps over the lazy dog") -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids  # [1, T]


def built_with_blocks(family: str, model, program: list[int]):
    """A fresh model of len(program) blocks whose block k holds a copy of ``model``'s block program[k]."""
    prefix = arch_spec(model).blocks + "."
    rebuilt = make_model(family, n_layers=len(program))
    source = model.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith(prefix)}
    for slot, block in enumerate(program):
        for key, value in source.items():
            if key.startswith(f"{prefix}{block}."):
                state[f"{prefix}{slot}." + key[len(f"{prefix}{block}.") :]] = value.clone()
    rebuilt.load_state_dict(state, strict=True)
    return rebuilt


PROGRAMS = {
    "skip": (lambda m: LayerProgram.skip(m, 1, 2), [0, 2]),
    "repeat": (lambda m: LayerProgram.repeat(m, 1, 3), [0, 1, 1, 1, 2]),
    "permute": (lambda m: LayerProgram.permute(m, [2, 0, 1]), [2, 0, 1]),
    "arbitrary": (lambda m: LayerProgram(m, [1, 1, 0, 0]), [1, 1, 0, 0]),
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_equals_model_built_with_those_blocks(family, tokenizer, name):
    model = make_model(family)
    make, program = PROGRAMS[name]
    rebuilt = built_with_blocks(family, model, program)
    ids = ids_for(tokenizer)
    base = model(ids, use_cache=False).logits
    with make(model):
        logits = model(ids, use_cache=False).logits
        residuals, _ = capture_residuals(model, ids)
    torch.testing.assert_close(logits, rebuilt(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert residuals.shape[0] == len(program) + 1
    assert not torch.allclose(logits, base)
    assert torch.equal(model(ids, use_cache=False).logits, base), "the model is restored on exit"


@pytest.mark.parametrize("name", ["arbitrary"])  # repeats, reorders and skips block 2
def test_cached_generation_under_program(family, tokenizer, name):
    model = make_model(family)
    make, program = PROGRAMS[name]
    rebuilt = built_with_blocks(family, model, program)
    ids = ids_for(tokenizer, "The server")
    with make(model):
        assert_cached_decoding_matches_full_passes(model, ids, max_new_tokens=5)  # the program's own cache
        assert_cached_decoding_matches_full_passes(model, ids, max_new_tokens=5, reference=rebuilt)


def test_cache_test_has_teeth_without_reindexing(tokenizer, monkeypatch):
    """Without re-indexing, a repeated block overwrites its own cache entry and cached decoding drifts."""
    from contextlib import nullcontext

    model = make_model("llama")
    ids = ids_for(tokenizer, "The server")
    monkeypatch.setattr(surgery, "_layer_index", lambda block, index: nullcontext())
    with LayerProgram.repeat(model, 1, 3):
        step1 = model(ids, use_cache=True)
        nxt = step1.logits[:, -1:].argmax(-1)
        cached = model(nxt, cache=step1.cache, use_cache=True).logits[:, -1]
        full = model(torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
        with pytest.raises(AssertionError, match="not close"):  # and the decoding check catches it
            assert_cached_decoding_matches_full_passes(model, ids, max_new_tokens=5)
    assert not torch.allclose(cached, full, atol=1e-4)


def test_hybrid_layer_types_follow_the_program(tokenizer):
    """Configs with per-layer ``layer_types`` (Qwen2 family) size their caches from it."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
    )
    config.initializer_range = 0.3
    model = prepare_model(AutoModelForCausalLM.from_config(config))
    assert isinstance(model.config.layer_types, list)
    ids = ids_for(tokenizer, "The server")
    with LayerProgram.repeat(model, 2, 3):
        assert len(model.config.layer_types) == 5
        assert_cached_decoding_matches_full_passes(model, ids, max_new_tokens=6)
    assert len(model.config.layer_types) == 3


def test_replace_with_zero_translator(family, tokenizer):
    model = make_model(family)
    ids = ids_for(tokenizer)
    base = model(ids, use_cache=False).logits
    with LayerProgram.replace(model, 1, 1, SpanTranslator.for_span(model, 1, 1)):
        assert torch.equal(model(ids, use_cache=False).logits, base)
    with LayerProgram.skip(model, 1, 3):
        skipped = model(ids, use_cache=False).logits
    with LayerProgram.translated(model, SpanTranslator.for_span(model, 1, 3)):
        assert torch.equal(model(ids, use_cache=False).logits, skipped)
        assert len(get_blocks(model)) == 2


def test_restored_after_exception(family, tokenizer):
    model = make_model(family)
    blocks, count = get_blocks(model), model.config.num_hidden_layers
    with pytest.raises(RuntimeError, match="indexes 3 blocks but the model has 6 on entry"):
        with compose(LayerProgram.repeat(model, 0, 4), LayerProgram.translated(model, SpanTranslator.for_span(model, 0, 0))):
            raise AssertionError("a program built for 3 blocks must not run on the 6 of another program")
    with pytest.raises(KeyError):
        with LayerProgram.repeat(model, 0, 4):
            with LayerProgram.skip(model, 0, 5):  # built inside: indexes the 6 slots of the outer program
                assert len(get_blocks(model)) == 1 and model.config.num_hidden_layers == 1
                raise KeyError("boom")
    assert get_blocks(model) is blocks and model.config.num_hidden_layers == count == N_LAYERS
    assert all(m.layer_idx == i for i, b in enumerate(blocks) for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int))
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: LayerProgram(m, [0, 3]), r"program step 1 is 3: .*block indices 0\.\.2"),
        (lambda m: LayerProgram(m, [0, -1]), r"program step 1 is -1"),
        (lambda m: LayerProgram(m, [0, True]), r"program step 1 is True"),
        (lambda m: LayerProgram(m, [0, 1.0]), r"program step 1 is 1.0"),
        (lambda m: LayerProgram(m, "012"), "program must be a sequence"),
        (lambda m: LayerProgram.skip(m, 2, 1), r"span 2\.\.1 is not valid: need 0 <= start <= end <= 3"),
        (lambda m: LayerProgram.skip(m, 0, 4), r"span 0\.\.4 is not valid"),
        (lambda m: LayerProgram.repeat(m, 3, 2), r"block 3 out of range: valid blocks are 0\.\.2"),
        (lambda m: LayerProgram.repeat(m, 0, 0), "times 0 must be an integer >= 1"),
        (lambda m: LayerProgram.permute(m, [0, 1, 1]), r"not a permutation of the block indices 0\.\.2"),
        (lambda m: LayerProgram.replace(m, 0, 1, "not a module"), "translator must be an nn.Module"),
    ],
)
def test_bad_programs(make, message):
    model = make_model("llama")
    with pytest.raises((ValueError, TypeError), match=message):
        make(model)
    assert model.config.num_hidden_layers == N_LAYERS and hook_count(model) == 0
