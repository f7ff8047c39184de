"""train.report_to: each tracker receives what metrics.jsonl logs, read back with the tracker's own
reader; nothing touches the network (wandb offline, mlflow to a local file store). Skipped when not installed."""

from __future__ import annotations

import json
import os

import pytest

from conftest import tiny_recipe
from qlora_kit.train import loop as train, trackers
from qlora_kit.cli.main import main
from qlora_kit.config import dump_recipe


def _train(tiny_model, tiny_data, run, tracker):
    recipe = tiny_recipe(tiny_model, tiny_data, train={"steps": 3, "save_every": 0, "report_to": [tracker]})
    train.run(recipe, run, progress=False)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_metrics(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = _train(tiny_model, tiny_data, tmp_path / "run", "tensorboard")
    (folder,) = (tmp_path / "run" / "tensorboard").iterdir()
    events = EventAccumulator(str(folder))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [m["step"] for m in metrics]
        assert [v for _, v in got] == pytest.approx([m[key] for m in metrics], rel=1e-6)


def _wandb_history(path) -> list[dict]:
    """The history rows of a .wandb file: a 7-byte header, then LevelDB-log records (32 KiB blocks; each record
    a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) holding wandb's own protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    buf, pos, block, part, rows = path.read_bytes(), 7, 32768, b"", []
    assert buf[:4] == b":W&B"
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        part += buf[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(tiny_model, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing is sent
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = _train(tiny_model, tiny_data, tmp_path / "run", "wandb")
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (history,) = [_wandb_history(p) for p in offline.glob("*.wandb")]  # what `wandb sync` would upload
    assert [h["_step"] for h in history] == [m["step"] for m in metrics]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert [h[key] for h in history] == pytest.approx([m[key] for m in metrics])


def test_mlflow_local_file_store_holds_the_metrics(tiny_model, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    metrics = _train(tiny_model, tiny_data, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == trackers.PROJECT]
    (run,) = client.search_runs([exp.experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(m["step"], pytest.approx(m["loss"])) for m in metrics]
    assert run.data.params["train.steps"] == "3"


def test_missing_tracker_is_exit_2_before_anything_is_written(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers.MODULES, "wandb", "no_such_tracker_module")
    recipe = tiny_recipe(tiny_model, tiny_data, train={"report_to": ["wandb"]})
    (tmp_path / "r.yaml").write_text(dump_recipe(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "wandb" in err and "pip install 'qlora-kit[wandb]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path) == ["r.yaml"]
