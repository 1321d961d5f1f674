"""Where a training run starts: a config file read and checked as a trainer or a recipe config
(:func:`load_config`), and the ``python -m TransferSegLib.training`` command (:func:`main`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..volume import TransferSegError
from .config import read_config, validate_config
from .recipes import run_recipe, validate_recipe
from .trainer import train

__all__ = ["load_config", "main"]


def load_config(path) -> dict:
    """Read a JSON training config (:func:`~TransferSegLib.training.config.read_config`) and check it
    whole, as a recipe config when it has a ``"recipe"`` key, else as a trainer config (errors name
    the key)."""
    config = read_config(path)
    if "recipe" in config:
        validate_recipe(config)
    else:
        validate_config(config)
    return config


def main(argv=None) -> int:
    """``python -m TransferSegLib.training CONFIG [--output DIR] [--max-steps N]`` (also under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m TransferSegLib.training",
                                     description="Train a TransferSeg model from a JSON config; rerun to resume.")
    parser.add_argument("config", help="training config (JSON); see Resources/configs/")
    parser.add_argument("-o", "--output", default=None, help="run folder (default: runs/<name>)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        if "recipe" in config:
            card = run_recipe(config, args.output or Path("runs") / config["name"], max_steps=args.max_steps)
            print(f"model: {card}" if card else "stopped early; run the same command again to resume")
            return 0
        result = train(config, args.output, max_steps=args.max_steps)
    except TransferSegError as e:
        print(f"training: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary())
    return 0
