"""Train a tuned lens: ``python train.py --config configs/default.yaml key=value ...``."""

from __future__ import annotations

import argparse

from lens.config import TrainConfig, load_config
from lens.train_lens import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML file under configs/ (defaults apply without one)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. optim.num_steps=10")
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    results = train(cfg)
    for name, res in results.get("lenses", {}).items():
        print(f"{name:>6} lens: mean KL over layers {res['mean_kl']:.3f} nats, mean CE {res['mean_ce']:.3f} nats")
    print(f"wrote {cfg.run_dir}")


if __name__ == "__main__":
    main()
