"""``python -m lens.convert <in> <out> [--model NAME]``: any loadable lens -> our safetensors format.

``<in>`` is one of our folders, a tuned-lens folder (``params.pt`` + ``config.json``), or a
tuned-lens hub id such as ``gpt2``. With ``--model`` the lens is checked against that model and
its unembedding fingerprint is recorded, so later loads can refuse a lens for another model.
"""

from __future__ import annotations

import argparse

from lens.io import read_lens_config
from lens.model import load_model
from lens.pretrained import convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lens.convert", description="Write a lens (ours, a tuned-lens folder, or a tuned-lens hub id) in this project's format.")
    parser.add_argument("src", help="lens folder (ours or tuned-lens) or tuned-lens hub id")
    parser.add_argument("dst", help="output folder (written complete or not at all)")
    parser.add_argument("--model", help="base model (hub id, folder, .gguf, or smollm2-135m) to check and fingerprint")
    parser.add_argument("--allow-mismatch", action="store_true", help="accept a lens whose fingerprint differs from --model's")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model)[0] if args.model else None
        out = convert(args.src, args.dst, model, allow_mismatch=args.allow_mismatch, overwrite=args.overwrite)
    except (OSError, ValueError) as err:  # bad input: one clear line, no traceback
        raise SystemExit(f"lens.convert: {err}") from err
    config = read_lens_config(out)
    print(
        f"wrote {out}: {config['num_layers']} layers, d={config['hidden_size']}, base model {config.get('base_model', '?')}, "
        f"fingerprint {config.get('unembed_sha256', 'none (pass --model to record one)')}"
    )


if __name__ == "__main__":
    main()
