"""The surgery and steering studies on a tiny model: programs from configs, sweeps, truncation,
pictures of cut models with translators from files, BOS-aligned steering, sampling, the steering grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TEXT, make_model, make_tokenizer, random_lens
from lens.artifacts.registry import save_lens, save_span_translator
from lens.cli import main
from lens.config import ProgramConfig, ReplaceConfig
from lens.core.translators import SpanTranslator
from lens.interventions import Ablation, ActAdd, LayerProgram, compose, hook_count

N = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("surgery")
    make_model("llama").save_pretrained(folder / "model")
    make_tokenizer().save_pretrained(folder / "model")
    (folder / "corpus.txt").write_text("\n\n".join(TEXT.split(". ")), encoding="utf-8")
    return folder


def common(inputs: Path, out: Path) -> list[str]:
    return [f"model.name={inputs / 'model'}", f"output_dir={out}", f"data.dataset={inputs / 'corpus.txt'}", "data.seq_len=16", "data.eval_percent=30"]


def ids_for(text: str = "The quick brown fox jumps over the lazy dog") -> torch.Tensor:
    return torch.tensor([make_tokenizer()(text)["input_ids"]])


def test_ablating_both_parts_of_a_block_is_skipping_it(family):
    model, ids = make_model(family), ids_for()
    base = model(ids, use_cache=False).logits
    with LayerProgram.skip(model, 1, 2):
        skipped = model(ids, use_cache=False).logits
    with compose(Ablation(model, 1, "attention"), Ablation(model, 1, "mlp")):
        assert torch.equal(model(ids, use_cache=False).logits, skipped)
    for part in ("attention", "mlp"):
        with Ablation(model, 1, part):
            alone = model(ids, use_cache=False).logits
        assert not torch.equal(alone, base) and not torch.equal(alone, skipped)
    assert torch.equal(model(ids, use_cache=False).logits, base) and hook_count(model) == 0
    with pytest.raises(ValueError, match="block 3 out of range"):
        Ablation(model, N, "mlp")


def test_programs_from_configs(inputs, tmp_path):
    model = make_model("llama")
    assert LayerProgram.from_config(model, ProgramConfig(skip=[1, 2])).program == [0, 2]
    assert LayerProgram.from_config(model, ProgramConfig(repeat=[1, 3])).program == [0, 1, 1, 1, 2]
    assert LayerProgram.from_config(model, ProgramConfig(swap=1)).program == [0, 2, 1]
    assert LayerProgram.from_config(model, ProgramConfig(steps=[2, 2, 0])).program == [2, 2, 0]
    save_span_translator(SpanTranslator.for_span(model, 1, 3), tmp_path / "t", model)
    program = LayerProgram.from_config(model, ProgramConfig(replace=ReplaceConfig(path=str(tmp_path / "t"), start=1, end=3)))
    assert isinstance(program.program[1], SpanTranslator) and len(program.program) == 2
    with pytest.raises(ValueError, match=r"stands in for blocks 1..3: replace.start=0 \(the file has 1\)"):
        LayerProgram.from_config(model, ProgramConfig(replace=ReplaceConfig(path=str(tmp_path / "t"), start=0)))
    with pytest.raises(ValueError, match="blocks: 3 vs model 4"):  # another model's shape is refused like a lens
        LayerProgram.from_config(make_model("llama", n_layers=4), ProgramConfig(replace=ReplaceConfig(path=str(tmp_path / "t"))))


def test_sweep_repeats_swaps_ablations_and_token_costs(inputs, tmp_path, capsys):
    main(["surgery", *common(inputs, tmp_path), "operations=[repeat,swap,ablate]", "explain=[1]", "sequences=2", "run_name=s"])
    programs = json.loads((tmp_path / "s" / "programs.json").read_text())["programs"]
    assert sorted(programs) == sorted([f"repeat {b}" for b in range(N)] + ["swap 0,1", "swap 1,2"] + [f"{p} {b}" for p in ("attention", "mlp") for b in range(N)])
    assert all(row["kl"] > 0 for row in programs.values())
    costs = json.loads((tmp_path / "s" / "token_costs.json").read_text())["costs"]
    assert set(costs) == {"skip 1", "attention 1", "mlp 1"} and len(costs["skip 1"]) > 0
    assert costs["skip 1"][0]["total_increase"] >= costs["skip 1"][-1]["total_increase"]
    assert (tmp_path / "s" / "programs.png").stat().st_size > 0 and not (tmp_path / "s" / "skip_sweep.json").exists()
    assert "hardest next tokens" in capsys.readouterr().out


def truncation_cuts(inputs: Path, out: Path, lens: str) -> dict:
    main(["surgery", "kind=truncate", *common(inputs, out), f"lens={lens}", "sequences=2", "lstsq_sequences=4",
          "translators=[lstsq]", "trainer.accelerator=cpu", "run_name=t"])
    return {(c["end"], c["removed"]): c for c in json.loads((out / "t" / "truncation.json").read_text())["cuts"]}


def test_truncation_curves(inputs, tmp_path):
    cuts = truncation_cuts(inputs, tmp_path, "logit")
    assert sorted(cuts) == sorted((end, k) for end in ("last", "first") for k in range(1, N + 1))
    # the logit lens reading the last residual of a model cut at its end is that model's own output
    for k in range(1, N + 1):
        assert cuts["last", k]["lens_ce"] == pytest.approx(cuts["last", k]["ce"]["plain"], abs=1e-4)
        assert set(cuts["last", k]["ce"]) == {"plain", "lstsq"}
    # removing every block from either end is the same model
    assert cuts["last", N]["ce"] == pytest.approx(cuts["first", N]["ce"], abs=1e-6)
    assert (tmp_path / "t" / "truncation.png").stat().st_size > 0
    # through a tuned lens the two ends read that one residual differently: as layer 0 (cut at the
    # end, what is left of the model) and as the layer it enters, the output (cut at the start)
    model = make_model("llama")
    save_lens(random_lens(model, seed=3, bias_std=0.5), tmp_path / "lens", model)
    cuts = truncation_cuts(inputs, tmp_path / "tuned", str(tmp_path / "lens"))
    assert cuts["first", N]["lens_ce"] == pytest.approx(cuts["first", N]["ce"]["plain"], abs=1e-4)
    assert abs(cuts["last", N]["lens_ce"] - cuts["first", N]["lens_ce"]) > 0.1


def test_pictures_of_cut_models_with_a_translator_from_its_file(inputs, tmp_path):
    model = make_model("llama")
    translator = SpanTranslator.for_span(model, 1, 3)
    with torch.no_grad():
        translator.bias.normal_(0, 0.2)
    save_span_translator(translator, tmp_path / "t", model)
    main(["surgery", "kind=picture", f"model.name={inputs / 'model'}", f"output_dir={tmp_path}", "run_name=p", "lens=logit",
          f"programs=[{{skip: [1, 2]}}, {{replace: {{path: {tmp_path / 't'}}}}}]", "generate.max_new_tokens=3",
          "steering={pairs: [[Love, Hate]], layer: 1, coefficient: 2.0}"])
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    names = list(summary["programs"])
    assert names[0].startswith("skip 1 + ") and names[1].startswith("translator from t + ")
    assert summary["programs"][names[0]]["rows"] == ["0", "2 (block 1 skipped)", "3"]
    assert summary["programs"][names[1]]["rows"] == ["0", "1 (into translator 1..3)", "3 (translator 1..3)"]
    for folder in ("skip_1", "translator_from_t"):
        assert {"heatmap_ce.png", "heatmap_kl.png", "picture.html", "picture.json"} <= {p.name for p in (tmp_path / "p" / folder).iterdir()}
    assert (tmp_path / "p" / "final_loss.png").stat().st_size > 0


def test_bos_aligned_steering_leaves_position_zero_alone(tokenizer):
    model = make_model("gpt2")
    with ActAdd(model, tokenizer, [("Love and calm", "Hate")], layer=2, coefficient=4.0, prepend_bos=True) as steer:
        pass
    torch.testing.assert_close(steer.steering[0], torch.zeros_like(steer.steering[0]), rtol=0, atol=1e-6)  # BOS - BOS
    assert steer.steering[1:].abs().max() > 0.1
    with ActAdd(model, tokenizer, [("Love and calm", "Hate")], layer=2, coefficient=4.0) as plain:
        pass
    assert plain.steering[0].abs().max() > 0.1  # without BOS, position 0 (the attention sink) is pushed


def test_sampled_continuations_share_seeds(tokenizer):
    from lens.config import GenerateConfig
    from lens.runs.steer import continuations

    model = make_model("llama")
    steer = ActAdd(model, tokenizer, [("Love", "Hate")], layer=1, coefficient=6.0)
    cfg = GenerateConfig(prompt="The server", max_new_tokens=5, temperature=1.0, top_p=0.9, samples=3)
    first = continuations(model, tokenizer, lambda: steer, cfg.prompt, cfg, seed=7)
    again = continuations(model, tokenizer, lambda: steer, cfg.prompt, cfg, seed=7)
    assert len(first.base) == len(first.steered) == 3 and first == again
    assert len(set(first.base)) > 1 and "temperature 1" in first.decoding
    greedy = continuations(model, tokenizer, lambda: steer, cfg.prompt, GenerateConfig(prompt="x", max_new_tokens=5), seed=7)
    assert len(greedy.base) == 1 and greedy.decoding == "greedy"


def test_steering_grid(inputs, tmp_path, capsys):
    main(["steer", "kind=sweep", *common(inputs, tmp_path), "run_name=g", "layers=[0,2]", "coefficients=[-4,4]", "sequences=2",
          "texts=[Love and hate,Love is all]"])
    grid = json.loads((tmp_path / "g" / "sweep.json").read_text())
    assert grid["layers"] == [0, 2] and grid["coefficients"] == [-4.0, 4.0]
    assert len(grid["held_out"]) == 2 and len(grid["held_out"][0]) == 2 and grid["on_topic"][1][1] != 0
    assert (tmp_path / "g" / "sweep.png").stat().st_size > 0 and "largest on-topic log-prob gain" in capsys.readouterr().out
