"""Prediction trajectory of one text: ``python eval/trajectory.py [--text "..."] [--lens FOLDER]``.

Writes ``trajectory.json`` (every statistic per layer x token, top-k tokens, prediction depth),
``trajectory.png`` and ``trajectory.html``; with a tuned lens also ``trajectory_js.png``.
"""

from __future__ import annotations

import argparse

from lens.model import DEFAULT_MODEL
from lens.trajectory import trajectory_report

DEFAULT_TEXT = "The package manager of Debian is called apt. To remove a package and its configuration files, run apt purge"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, folder, .gguf file, or smollm2-135m")
    parser.add_argument("--lens", help="lens folder or tuned-lens hub id (default: checkpoints/<model> if trained, else the logit lens)")
    parser.add_argument("--out", default=f"eval/out/{DEFAULT_MODEL}")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--metric", default="entropy", choices=("ce", "kl", "entropy"), help="heatmap colour")
    args = parser.parse_args(argv)
    result = trajectory_report(args.text, args.out, args.model, args.lens, args.top_k, args.max_tokens, args.metric)
    depth = result["prediction_depth"]
    print(f"{result['lens']} lens, {len(depth)} tokens, mean prediction depth {sum(depth) / len(depth):.2f}; wrote {args.out}/trajectory.*")


if __name__ == "__main__":
    main()
