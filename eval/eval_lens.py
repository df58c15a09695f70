"""Held-out evaluation in depth: ``python eval/eval_lens.py [--config FILE] key=value ...``.

Keys are those of ``lens.eval_depth.EvalDepthConfig`` (e.g. ``sequences=4 lens_path=...``).
Writes ``eval_depth.json``, ``eval_depth.png`` and, for a tuned lens, ``transfer.png``.
"""

from __future__ import annotations

import argparse

from lens.config import load_config, run_cli
from lens.eval_depth import EvalDepthConfig, run_eval


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (defaults apply without one)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. sequences=4")
    args = parser.parse_args(argv)
    cfg = load_config(EvalDepthConfig, args.config, args.overrides)
    results = run_eval(cfg)
    for name, res in results["lenses"].items():
        print(
            f"{name:>6} lens: mean CE {res['mean_ce']:.3f} nats/token = {res['mean_ce_bpb']:.3f} bits/byte, "
            f"final-layer agreement at layer 0 {res['agreement'][0]:.2f}, mean prediction depth {res['mean_depth']:.2f}"
        )
    print(f"wrote {cfg.out_dir}")


if __name__ == "__main__":
    run_cli(main)
