"""How a result was made (result.json["provenance"]) and --deterministic: the same input twice gives
byte-identical files."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from TransferSegLib.io import save_volume
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "TransferSegLib.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    save_volume(ct_phantom(seed=40, shape=(12, 40, 40))[0], folder / "ct_000.nii.gz")
    save_volume(dbt_phantom(3, shape=(8, 48, 40))[0], folder / "dbt.nii.gz")
    return folder


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_result_json_records_how_the_result_was_made(tmp_path, tiny_model, phantom_dir):
    source = phantom_dir / "ct_000.nii.gz"
    run = _cli("segment", source, "-o", tmp_path / "out", "--model", tiny_model, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))["provenance"]
    card = json.loads(Path(tiny_model).read_text(encoding="utf-8"))
    assert record["model"] == {"name": card["name"], "version": card["version"], "sha256": card["weights"]["sha256"]}
    assert record["torch"] == torch.__version__ and record["simpleitk"] == sitk.Version.VersionString()
    assert record["device"] == "cpu" and record["threads"] >= 1 and record["cuda"] in (None, torch.version.cuda)
    assert record["command"][1:] == ["segment", str(source), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                                     "--device", "cpu"]
    assert record["deterministic"] is False
    started, ended = (datetime.fromisoformat(record[k]) for k in ("started", "ended"))
    assert started <= ended and started.tzinfo is not None
    # a source checkout names its commit: the one git itself reports
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git_commit"] == head.stdout.strip() == git_commit()


def test_deterministic_runs_give_byte_identical_files(tmp_path, tiny_model, tiny_heatmap_model, phantom_dir):
    dbt = phantom_dir / "dbt.nii.gz"
    for command, source, model in (("segment", phantom_dir / "ct_000.nii.gz", tiny_model),
                                   ("detect", dbt, tiny_heatmap_model)):
        outputs = []
        for n in range(2):
            out = tmp_path / f"{command}-{n}"
            run = _cli(command, source, "-o", out, "--model", model, "--device", "cpu", "--deterministic")
            assert run.returncode == 0, run.stderr
            outputs.append(_files(out))
        first, second = outputs
        assert first.keys() == second.keys() and len(first) >= 4
        for name in first:
            if name == "result.json":  # equal but for the times it records
                a, b = (json.loads(files[name]) for files in outputs)
                for record in (a, b):
                    record.pop("timings_s")
                    for key in ("started", "ended", "command"):
                        record["provenance"].pop(key)
                assert a == b and a["provenance"]["deterministic"] is True
            else:
                assert first[name] == second[name], f"{command}: {name} differs between two deterministic runs"
