"""Train a tuned lens: ``python train.py --config configs/default.yaml key=value ...``.

A YAML with top-level ``kind: translator`` trains a span translator instead
(``configs/translator_smollm2.yaml``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from lens.config import TrainConfig, TranslatorTrainConfig, load_config, run_cli
from lens.train_lens import train
from lens.train_translator import train_translator


def run_kind(config: str | None, overrides: list[str]) -> str:
    """The YAML's top-level ``kind`` (or a ``kind=...`` override); ``lens`` when absent."""
    kinds = [o.split("=", 1)[1] for o in overrides if o.startswith("kind=")]
    if kinds:
        return kinds[-1]
    if config is not None and Path(config).is_file():
        return str(OmegaConf.load(config).get("kind", "lens"))
    return "lens"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML file under configs/ (defaults apply without one)")
    parser.add_argument("--resume", metavar="PATH", help="continue a lens run from this checkpoint (resume=true: the run's last one)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. optim.num_steps=10")
    args = parser.parse_args(argv)
    kind = run_kind(args.config, args.overrides)
    if kind not in ("lens", "translator"):
        raise SystemExit(f"train.py trains kind 'lens' (no kind key) or 'translator', got kind={kind!r}")
    if kind == "translator":
        cfg_t = load_config(TranslatorTrainConfig, args.config, args.overrides)
        res = train_translator(cfg_t)
        for span in res.get("spans", []):
            print(f"span {span['start']}..{span['end']}: CE intact {res['intact_ce']:.3f}, skip {span['skip_ce']:.3f}, "
                  f"translator {span['translator_ce']:.3f} nats")
        print(f"wrote {cfg_t.run_dir}")
        return
    cfg = load_config(TrainConfig, args.config, args.overrides)
    results = train(cfg, resume_from=args.resume)
    for name, res in results.get("lenses", {}).items():
        print(f"{name:>6} lens: mean KL over layers {res['mean_kl']:.3f} nats, mean CE {res['mean_ce']:.3f} nats")
    print(f"wrote {cfg.run_dir}")


if __name__ == "__main__":
    run_cli(main)
