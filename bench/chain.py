"""Training a chain of configs for the reproduction benches (``ahnet_dbt.py``, ``ahnet_ct.py``).

Each entry is (table name, config file in ``Resources/configs``); a config whose
``init_weights.transfer_from`` names a model is pointed at the model the chain's first entry
(the MC-GCN) just trained, so the AH-Net's encoder is the one trained in the same run.
"""
from __future__ import annotations

import copy
import csv
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "Resources" / "configs"


def quick(config: dict) -> dict:
    """A few steps on 4 volumes: the whole chain, not a result."""
    config = copy.deepcopy(config)
    config["data"]["count"] = 4
    for stage in config["stages"]:
        stage["steps"] = 4
        switch = stage["loss"].get("switch")
        if switch and "on_plateau" in switch:
            switch["on_plateau"] = {"patience": 2, "min_delta": 0.0, "window": 1}
    config["checkpoint_every"] = 1000
    return config


def train_chain(networks, out: Path, threads: int, is_quick: bool) -> dict:
    """Train the networks in order; returns {name: (card path, seconds, steps per stage)}.

    A rerun with the same ``out`` resumes unfinished runs and reuses finished ones; the seconds
    are the training time over all sessions (the run log's cumulative ``elapsed_s``).
    """
    from TransferSegLib.training import load_config, train

    trained = {}
    for name, file in networks:
        config = load_config(CONFIGS / file)
        if is_quick:
            config = quick(config)
        if config.get("init_weights") and "transfer_from" in config["init_weights"]:
            config["init_weights"] = {"transfer_from": str(next(iter(trained.values()))[0])}
        config["threads"] = threads
        config["progress_bar"] = False
        start = time.perf_counter()
        result = train(config, out / config["name"])
        seconds = time.perf_counter() - start
        if result.log_path and result.log_path.exists():
            with result.log_path.open(encoding="utf-8", newline="") as log:
                rows = list(csv.DictReader(log))
            seconds = float(rows[-1]["elapsed_s"]) if rows else seconds
        steps = [s["steps"] for s in config["stages"]]
        print(f"  trained {name:<9} {'+'.join(map(str, steps)):>8} steps in {seconds:6.0f} s "
              f"(final loss {result.final_loss:.4g}) -> {result.card_path}", flush=True)
        trained[name] = (result.card_path, seconds, steps)
    return trained
