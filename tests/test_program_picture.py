"""Per-token pictures of layer programs: which layer each slot's residual is read as, and true colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from conftest import make_model, random_lens
from lens.analysis.picture import build_picture, identity_rows, program_rows
from lens.core.metrics import Reading, lens_token_stats
from lens.core.residuals import capture_residuals
from lens.core.translators import SpanTranslator, Unembed
from lens.interventions import ActAdd, LayerProgram, compose, hook_count
from lens.report.plots import GAP_COLOUR, heatmap_figure, plot_token_heatmaps

SENTENCE = "Love and hate, anger and calm: a steering vector adds one to the other."
N = 4  # blocks of the model these tests cut


@pytest.fixture
def setup(tokenizer):
    model = make_model("llama", n_layers=N)
    return model, random_lens(model, seed=7, bias_std=0.3), tokenizer


def picture_of(setup, program: LayerProgram, **kwargs):
    model, lens, tokenizer = setup
    return build_picture(model, tokenizer, SENTENCE, lens, lambda: program, rows=program_rows(program, N), **kwargs)


def reading_of(setup, residual: torch.Tensor, logits: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """The lens' statistics of one residual ``[T, d]``, read with translator ``layer``."""
    model, lens, tokenizer = setup
    ids = torch.tensor(tokenizer(SENTENCE)["input_ids"])
    targets = torch.cat([ids[1:], torch.tensor([-100])])
    return lens_token_stats(lens, Unembed(model), Reading(residual[None], logits, targets), layers=[layer])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(), b.nan_to_num())


def test_rows_of_every_kind_of_program(setup):
    model = setup[0]
    labels = lambda program: [row.label for row in program_rows(program, N)]  # noqa: E731
    assert program_rows(LayerProgram(model, list(range(N))), N) == identity_rows(N)
    assert labels(LayerProgram.skip(model, 1, 3)) == ["0", "3 (blocks 1..2 skipped)", "4"]
    assert labels(LayerProgram.skip(model, 2, 4)) == ["0", "1", "2"]  # the last two removed: the output is read as layer 2
    assert labels(LayerProgram.repeat(model, 1, 2)) == ["0", "1", "1 (repeat)", "2", "3", "4"]
    assert labels(LayerProgram.permute(model, [1, 0, 2, 3])) == ["1 (block 0 skipped)", "0", "2", "3", "4"]
    translator = SpanTranslator.for_span(model, 1, 3)
    assert labels(LayerProgram.translated(model, translator)) == ["0", "1 (into translator 1..3)", "3 (translator 1..3)", "4"]
    assert labels(LayerProgram.translated(model, SpanTranslator.for_span(model, 2, 4)))[-1] == "4 (translator 2..4)"


def test_the_identity_program_gives_the_intact_picture_exactly(setup):
    picture = picture_of(setup, LayerProgram(setup[0], list(range(N))))
    for name in ("ce", "kl", "entropy", "top_ids", "top_probs", "output_ce"):
        assert same(getattr(picture.intervened, name), getattr(picture.base, name)), name
    assert picture.aligned == list(range(N + 1))
    assert (picture.panels("ce")["diff"].nan_to_num() == 0).all()


def test_a_skip_reads_the_skipped_residual_as_the_span_end(setup):
    model, lens, tokenizer = setup
    picture = picture_of(setup, LayerProgram.skip(model, 1, 3))
    ids = torch.tensor([tokenizer(SENTENCE)["input_ids"]])
    residuals, logits = capture_residuals(model, ids)  # the intact run: [L+1, 1, T, d]
    # up to the cut the rows read what the intact rows read (KL is to each model's own output, so it moves)
    for name in ("ce", "entropy", "top_ids"):
        assert same(getattr(picture.intervened, name)[0], getattr(picture.base, name)[0])
    # after it: the residual after 1 block (unchanged), read with translator 3, as the cut model now treats it
    with LayerProgram.skip(model, 1, 3):
        _, cut_logits = capture_residuals(model, ids)
    expected = reading_of(setup, residuals[1, 0], cut_logits[0], layer=3)
    assert same(picture.intervened.ce[1], expected["ce"][0]) and same(picture.intervened.kl[1], expected["kl"][0])
    assert not same(picture.intervened.ce[1], picture.base.ce[1])  # the translator of layer 3, not of layer 1
    # the output row is the cut model's own output; the removed layers are gaps in the difference
    assert same(picture.intervened.ce[-1], picture.intervened.output_ce) and (picture.intervened.kl[-1] == 0).all()
    assert picture.aligned == [0, None, None, 1, 2]
    diff = picture.panels("ce")["diff"]
    assert diff[1:3].isnan().all() and not diff[3, :-1].isnan().any()
    assert picture.row_labels("diff")[1] == "1 (removed)"


def test_a_translator_slot_is_read_as_its_span_end(setup):
    model, lens, tokenizer = setup
    translator = SpanTranslator.for_span(model, 1, 3)
    with torch.no_grad():
        translator.weight.normal_(0, 0.1)
        translator.bias.normal_(0, 0.3)
    picture = picture_of(setup, LayerProgram.translated(model, translator))
    ids = torch.tensor([tokenizer(SENTENCE)["input_ids"]])
    residuals, _ = capture_residuals(model, ids)
    with LayerProgram.translated(model, translator):
        _, cut_logits = capture_residuals(model, ids)
    with torch.no_grad():
        translated = translator(residuals[1, 0])
    expected = reading_of(setup, translated, cut_logits[0], layer=3)
    assert same(picture.intervened.ce[2], expected["ce"][0]) and same(picture.intervened.entropy[2], expected["entropy"][0])
    assert [row.layer for row in picture.intervened.rows] == [0, 1, 3, 4] and picture.aligned == [0, 1, None, 2, 3]


def test_repeats_and_steering_compose(setup):
    model, lens, tokenizer = setup
    program = LayerProgram.repeat(model, 2, 2)
    steer = ActAdd(model, tokenizer, [("Love", "Hate")], layer=1, coefficient=4.0)
    picture = build_picture(model, tokenizer, SENTENCE, lens, lambda: compose(program, steer), rows=program_rows(program, N))
    assert picture.row_labels("intervened") == ["0", "1", "2", "2 (repeat)", "3", "4"]
    assert picture.aligned == [0, 1, 3, 4, 5]  # a repeated layer aligns with its last visit
    assert same(picture.intervened.ce[0], picture.base.ce[0]) and not same(picture.intervened.ce[1], picture.base.ce[1])
    assert hook_count(model) == 0 and model.config.num_hidden_layers == N


def test_rows_must_match_the_program(setup):
    model, lens, tokenizer = setup
    with pytest.raises(ValueError, match="program_rows"):
        build_picture(model, tokenizer, SENTENCE, lens, lambda: LayerProgram.skip(model, 0, 1))


def test_difference_panel_holds_only_colours_of_its_colour_map(setup, tmp_path):
    model = setup[0]
    picture = picture_of(setup, LayerProgram.skip(model, 1, 3))
    fig, axes = heatmap_figure(picture, "ce", write_tokens=False)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)  # [H, W, 3]
    box = axes["diff"].get_window_extent()
    height = pixels.shape[0]
    inside = pixels[int(height - box.y1) + 3 : int(height - box.y0) - 3, int(box.x0) + 3 : int(box.x1) - 3]
    allowed = np.round(colormaps["RdBu_r"](np.linspace(0, 1, 256))[:, :3] * 255).astype(int)
    gap = np.array([int(GAP_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    allowed = np.vstack([allowed, gap])
    colours = np.unique(inside.reshape(-1, 3), axis=0)
    distance = np.abs(colours[:, None, :] - allowed[None]).max(-1).min(-1)  # [colours]
    assert (distance <= 1).all(), colours[distance > 1][:5]
    assert len(colours) > 3  # the panel shows a real range of values, and the gap
    # written as true colour: PNG colour type 2 (RGB) or 6 (RGBA), never 3 (palette)
    path = plot_token_heatmaps(picture, tmp_path / "h.png")
    assert path.read_bytes()[25] in (2, 6)
