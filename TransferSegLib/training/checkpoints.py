"""Resumable checkpoints: weights and optimizer state as safetensors, JSON with their sha256."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_output
from ..volume import TransferSegError
from ..weights import sha256_file

CHECKPOINT_FORMAT = "transferseg-checkpoint-1"
# keys that change how a run is executed or reported, not what it computes: a resumed run may change them
RUNTIME_KEYS = ("threads", "workers", "device", "progress_bar", "checkpoint_every", "keep_checkpoints", "log_every")


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _optimizer_to_files(state_dict: dict):
    """Split an optimizer state_dict into safetensors tensors and a JSON-able rest."""
    tensors, state = {}, {}
    for index, entries in state_dict["state"].items():
        state[str(index)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                key = f"state.{index}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                state[str(index)][name] = {"tensor": key}
            else:
                state[str(index)][name] = {"value": value}
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state = {}
    for index, entries in meta["state"].items():
        state[int(index)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def write_json(path: Path, payload) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n", encoding="utf-8")


def save_checkpoint(out: Path, step: int, network: nn.Module, optimizer, state: dict, keep: int) -> Path:
    """Write checkpoint-<step>/ file by file (each atomically), then point checkpoint.json at it."""
    folder = out / f"checkpoint-{step:08d}"
    weights = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
    files = {}
    for name, tensors in (("weights.safetensors", weights), ("optimizer.safetensors", opt_tensors)):
        with atomic_output(folder / name) as tmp:
            save_file(tensors, str(tmp))
            files[name] = sha256_file(tmp)
    with atomic_output(folder / "optimizer.json") as tmp:
        tmp.write_text(json.dumps(opt_meta, default=_json_default) + "\n", encoding="utf-8")
        files["optimizer.json"] = sha256_file(tmp)
    write_json(folder / "state.json", dict(state, format=CHECKPOINT_FORMAT, step=step, files=files))
    write_json(out / "checkpoint.json", {"latest": folder.name, "step": step})
    # older ones beyond ``keep``, and leftovers of a killed run past this step, are not pointed at
    folders = sorted(f for f in out.glob("checkpoint-[0-9]*") if f.is_dir() and f.name[11:].isdigit())
    older = [f for f in folders if int(f.name[11:]) < step]
    for old in older[: max(0, len(older) - (keep - 1))] + [f for f in folders if int(f.name[11:]) > step]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(out: Path) -> Optional[dict]:
    """The latest complete checkpoint's state (with its folder), its files' checksums verified."""
    pointer = out / "checkpoint.json"
    if not pointer.exists():
        return None
    try:
        folder = out / json.loads(pointer.read_text(encoding="utf-8"))["latest"]
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, KeyError, ValueError) as e:
        raise TransferSegError(f"{pointer}: the checkpoint cannot be read ({e}); delete {out} to start afresh") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise TransferSegError(f"{folder}: not a TransferSeg checkpoint of format {CHECKPOINT_FORMAT}")
    for name, digest in state["files"].items():
        if not (folder / name).exists() or sha256_file(folder / name) != digest:
            raise TransferSegError(f"{folder / name}: missing or damaged (checksum mismatch); delete {folder.name} "
                                   "and checkpoint.json to restart from scratch")
    state["folder"] = folder
    return state


def restore_network(state: dict, network: nn.Module, device) -> None:
    """The checkpoint's weights (``state`` from :func:`load_checkpoint`) into ``network``."""
    network.load_state_dict(load_file(str(state["folder"] / "weights.safetensors"), device=str(device)))


def restore_optimizer(state: dict, optimizer, device) -> None:
    """The checkpoint's optimizer state (``state`` from :func:`load_checkpoint`) into ``optimizer``."""
    tensors = load_file(str(state["folder"] / "optimizer.safetensors"), device=str(device))
    meta = json.loads((state["folder"] / "optimizer.json").read_text(encoding="utf-8"))
    optimizer.load_state_dict(optimizer_from_files(tensors, meta))


def remove_partial_files(out: Path) -> None:
    """Temporary files of io.atomic_output that a killed run left behind (never a finished file)."""
    if out.is_dir():
        for path in list(out.glob(".*.partial-*")) + list(out.glob("checkpoint-*/.*.partial-*")) \
                + list(out.glob("model/.*.partial-*")):
            path.unlink(missing_ok=True)


def check_same_run(saved: dict, config: dict, out: Path) -> None:
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in RUNTIME_KEYS and saved.get(k) != config.get(k))
    if differ:
        raise TransferSegError(
            f"{out} holds a run of a different config (differs in {', '.join(differ)}); "
            "use another output folder, or delete this one to start afresh"
        )
