"""Tiny random models of each family and a tiny byte-level tokenizer, all built offline."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from lens.core.model import prepare_model, prepare_tokenizer
from lens.core.translators import TunedLens

TEXT = (
    "The quick brown fox jumps over the lazy dog. A lens reads the residual stream of a model. "
    "Packages are installed with apt and removed with apt purge. The server starts at boot time. "
    "Love and hate, anger and calm: a steering vector adds one to the other. "
) * 20

D_MODEL, N_LAYERS, VOCAB = 32, 3, 300


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    return prepare_tokenizer(fast)


def make_model(family: str, n_layers: int = N_LAYERS, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        config = GPT2Config(n_layer=n_layers, n_embd=D_MODEL, n_head=4, n_positions=128, **common)
    elif family == "gpt_neox":
        config = GPTNeoXConfig(
            num_hidden_layers=n_layers, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, **common,
        )
    elif family == "llama":
        config = LlamaConfig(
            num_hidden_layers=n_layers, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128, **common,
        )
    else:
        raise ValueError(family)
    config.initializer_range = 0.3  # the default 0.02 gives near-uniform outputs at this width
    return prepare_model(AutoModelForCausalLM.from_config(config))


FAMILIES = ["gpt2", "gpt_neox", "llama"]


def random_lens(model, seed: int = 0, bias_std: float = 0.1) -> TunedLens:
    """A tuned lens with random (non-identity) translators, for checks that must not pass by accident."""
    torch.manual_seed(seed)
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.1)
        lens.bias.normal_(0, bias_std)
    return lens


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): with
    two threads on a busy 2-core machine each of hundreds of tiny passes waits on the other thread
    (50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_model(family)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    import json

    sentences = TEXT.split(". ")
    with path.open("w") as f:
        for i in range(60):
            f.write(json.dumps({"text": ". ".join(sentences[i % 7 : i % 7 + 5])}) + "\n")
    return path


# Comparisons that hold under any summation order. Two batchings, chunkings, thread counts or BLAS
# kernels give floats that differ in the last bits, so argmax-derived integers (top-k ids, ranks,
# greedy tokens) can flip where two scores nearly tie. These helpers stay exact wherever the
# reference has a clear winner and let only near ties go either way.
TIE = 1e-3
"""Score gap (nats or logits) under which two candidates count as tied."""


def clear_argmax(scores: torch.Tensor, margin: float = TIE) -> torch.Tensor:
    """``[..., V] -> [...]``: True where the top score leads the runner-up by more than ``margin``."""
    top2 = scores.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1] > margin


def assert_rank(got: float, scores: torch.Tensor, index: int, tol: float = TIE) -> None:
    """``got`` is the rank (0 = best) of ``scores[index]`` in ``scores`` ``[V]``, up to near ties."""
    target = scores[index]
    low = int((scores > target + tol).sum())
    high = int((scores > target - tol).sum()) - 1  # the target itself is within tol of itself
    assert low <= got <= high, f"rank {got} outside [{low}, {high}]"


def assert_top_k(got_ids: torch.Tensor, scores: torch.Tensor, tol: float = TIE) -> None:
    """``got_ids`` ``[k]`` are a top-k of ``scores`` ``[V]`` in order: their scores are the k best, up to near ties."""
    best = scores.topk(len(got_ids)).values
    torch.testing.assert_close(scores[got_ids], best, rtol=0, atol=tol)


def assert_cached_decoding_matches_full_passes(model, ids: torch.Tensor, max_new_tokens: int, reference=None) -> torch.Tensor:
    """Greedy cached decoding of ``model`` as it is hooked now, checked step by step against one full
    uncached pass over the tokens it produced (of ``reference`` when given, e.g. a model built with a
    program's blocks). Logits are compared, not tokens: the cached and full paths sum in different
    orders, and a near tie would flip a token without anything being wrong. Returns the sequence."""
    out = model.generate(
        ids, use_cache=True, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=model.config.eos_token_id, output_logits=True, return_dict_in_generate=True,
    )
    cached = torch.cat(out.logits)  # [new, V]: the logits each decode step chose from (EOS may end it early)
    first = ids.shape[1] - 1
    full = (reference or model)(out.sequences, use_cache=False).logits[0, first : first + len(cached)]  # [new, V]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    return out.sequences
