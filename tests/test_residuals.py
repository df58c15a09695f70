"""Residual capture sees raw block outputs, and the architecture table finds the right modules."""

import pytest
import torch
from transformers import BertConfig, BertLMHeadModel

from lens.core.arch import get_blocks, get_final_norm, get_unembed
from lens.core.model import prepare_model
from lens.core.residuals import capture_residuals


def test_residuals_are_raw_block_outputs(tiny_model):
    ids = torch.randint(0, 300, (2, 12))
    residuals, logits = capture_residuals(tiny_model, ids)
    n_layers = len(get_blocks(tiny_model))
    assert residuals.shape == (n_layers + 1, 2, 12, tiny_model.config.hidden_size)

    # Layer 0 is the embedding output; every later layer is the previous one run through its block.
    out = tiny_model(ids, output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(residuals[0], out.hidden_states[0])
    # The last HF hidden state has the final norm applied; our last residual must not.
    norm = get_final_norm(tiny_model)
    torch.testing.assert_close(norm(residuals[-1]), out.hidden_states[-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(residuals[-1], out.hidden_states[-1], atol=1e-3)
    # Model logits are the unembedding of the normed raw final residual.
    torch.testing.assert_close(get_unembed(tiny_model)(norm(residuals[-1])), logits, rtol=1e-5, atol=1e-5)


def test_hooks_are_removed(tiny_model):
    capture_residuals(tiny_model, torch.randint(0, 300, (1, 5)))
    for block in get_blocks(tiny_model):
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_unmapped_architecture_names_the_class():
    model = BertLMHeadModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16, is_decoder=True))
    with pytest.raises(NotImplementedError, match="BertLMHeadModel.*model_type='bert'"):
        prepare_model(model)
