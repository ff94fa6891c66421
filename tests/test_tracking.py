"""Experiment tracking through transformers' own integrations, on CPU with the network blocked: one
quickstart run reports to TensorBoard, W&B, MLflow and Trackio at once, each writing under the run's
folder, and each tracker's own reader finds in it the train loss, the eval loss and ftune's figures
as metrics.jsonl has them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ftune.recipe import load_recipe
from ftune.workflows.common import tracking_session
from tests.conftest import QUICKSTART

STEPS = 4  # a training log and an evaluation at steps 2 and 4
TRACKERS = "[tensorboard, wandb, mlflow, trackio]"
# What a user's environment may say to the trackers: cleared, so that the test sees ftune's defaults
_USER_SETTINGS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_BASE_URL",
                  "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_RUN_ID",
                  "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TENSORBOARD_LOGGING_DIR")
# ftune's own figures on CPU (a GPU adds ftune/vram_allocated_gib, ftune/vram_peak_gib, ...)
FTUNE_FIGURES = {"ftune/tokens_per_s", "ftune/rss_gib", "ftune/host_offload_gib"}


def _user_environment(monkeypatch, home: Path) -> None:
    """A fresh machine: no tracker settings, no W&B login (an empty .netrc), no telemetry."""
    for name in _USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    netrc = home / ".netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


# The tracked run, in a process of its own: Trackio reads where its database goes once, when first
# imported, and another test of the suite may have imported it already in this one
_TRACKED_RUN = """
import json, os, socket, sys
attempts = []
connect = socket.socket.connect

def local_only(sock, address):  # connections beyond this machine fail, and are recorded
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        attempts.append(str(address))
        raise OSError(f"the test blocks the network: {address}")
    return connect(sock, address)

socket.socket.connect = local_only
from ftune.recipe import load_recipe
from ftune.runner import train

recipe, overrides, settings, report = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
train(load_recipe(recipe, overrides))
# tracking_session takes back what it set (MLflow and W&B leave their run's ids, as they do anywhere)
json.dump({"attempts": attempts, "left": sorted(set(settings) & set(os.environ))}, open(report, "w"))
"""


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The run's folder and its metrics.jsonl records, split into training logs and evaluations."""
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    report = out.parent / "report.json"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _user_environment(monkeypatch, out.parent)
        overrides = [f"training.output_dir={out}", f"training.max_steps={STEPS}", "training.batch_size=4",
                     "data.limit=200", "training.logging_steps=2", "data.eval=0.05", "training.eval_steps=2",
                     f"training.report_to={TRACKERS}"]
        subprocess.run([sys.executable, "-c", _TRACKED_RUN, str(QUICKSTART), json.dumps(overrides),
                        json.dumps(_USER_SETTINGS), str(report)], env=dict(os.environ), check=True)
    done = json.loads(report.read_text())
    assert done == {"attempts": [], "left": []}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "loss" in r]
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in logs] == [r["step"] for r in evaluations] == [2, 4]
    return out, logs, evaluations


def _wandb_records(path: Path):
    """The records of a W&B run's transaction log (`run-ID.wandb`), which W&B ships no reader for:
    LevelDB's log format after a 7-byte header, each record a `wandb.proto` Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.slow
def test_wandb_writes_an_offline_run_in_the_run_folder(tracked):
    out, logs, evaluations = tracked
    [run_dir] = (out / "wandb").glob("offline-run-*")  # offline: no login on this machine
    history, run, exit_code = [], None, None
    for record in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            run = record.run
        elif kind == "exit":
            exit_code = record.exit.exit_code
    assert (run.project, run.display_name, exit_code) == ("ftune", "quickstart", 0)  # finished at the end
    trained = [h for h in history if "train/loss" in h]
    assert [h["train/global_step"] for h in trained] == [r["step"] for r in logs]
    assert [h["train/loss"] for h in trained] == pytest.approx([r["loss"] for r in logs])
    evaluated = [h["eval/loss"] for h in history if "eval/loss" in h]
    assert evaluated == pytest.approx([r["eval_loss"] for r in evaluations])
    assert {f"train/{name}" for name in FTUNE_FIGURES} <= set(trained[-1])
    assert trained[-1]["train/ftune/tokens_per_s"] == pytest.approx(logs[-1]["tokens_per_s"])


@pytest.mark.slow
def test_mlflow_writes_a_local_store_in_the_run_folder(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, logs, evaluations = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked
    client = MlflowClient((out / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert (run.info.run_name, run.info.status) == ("quickstart", "FINISHED")

    def history(key):
        metrics = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        return [(m.step, m.value) for m in metrics]

    assert history("loss") == [(r["step"], pytest.approx(r["loss"])) for r in logs]
    assert history("eval_loss") == [(r["step"], pytest.approx(r["eval_loss"])) for r in evaluations]
    assert FTUNE_FIGURES <= set(run.data.metrics)
    assert history("ftune/tokens_per_s")[-1] == (STEPS, pytest.approx(logs[-1]["tokens_per_s"]))


@pytest.mark.slow
def test_trackio_writes_its_database_in_the_run_folder(tracked):
    out, logs, evaluations = tracked
    assert (out / "trackio" / "ftune.db").is_file()
    environment = {**os.environ, "TRACKIO_DIR": str(out / "trackio")}

    def trackio(*args):
        done = subprocess.run([sys.executable, "-m", "trackio.cli", *args, "--project", "ftune", "--json"],
                              env=environment, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    assert trackio("list", "runs")["runs"] == ["quickstart"]
    assert {f"train/{name}" for name in FTUNE_FIGURES} | {"train/loss", "eval/loss"} <= set(
        trackio("list", "metrics", "--run", "quickstart")["metrics"])

    def values(metric):  # Trackio counts its own steps (one per log); the trainer's step is train/global_step
        logged = trackio("get", "metric", "--run", "quickstart", "--metric", metric)["values"]
        return [entry["value"] for entry in logged]

    assert values("train/loss") == pytest.approx([r["loss"] for r in logs])
    assert values("eval/loss") == pytest.approx([r["eval_loss"] for r in evaluations])


@pytest.mark.slow
def test_tensorboard_beside_the_others(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs, evaluations = tracked
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in logs]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([r["eval_loss"] for r in evaluations])


def _recipe(tmp_path, trackers=TRACKERS):
    return load_recipe(QUICKSTART, [f"training.output_dir={tmp_path / 'run'}", f"training.report_to={trackers}"])


def test_wandb_goes_online_only_for_a_logged_in_user(tmp_path, monkeypatch):
    _user_environment(monkeypatch, tmp_path)
    with tracking_session(_recipe(tmp_path)) as chosen:
        assert chosen["WANDB_MODE"] == "offline" and os.environ["WANDB_MODE"] == "offline"
        assert chosen["WANDB_DIR"] == str((tmp_path / "run").resolve())
    assert "WANDB_MODE" not in os.environ

    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    with tracking_session(_recipe(tmp_path)) as chosen:  # `wandb login` wrote the key: W&B's own default
        assert "WANDB_MODE" not in chosen and "WANDB_MODE" not in os.environ

    (tmp_path / ".netrc").write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    with tracking_session(_recipe(tmp_path)) as chosen:
        assert "WANDB_MODE" not in chosen


def test_the_users_settings_win(tmp_path, monkeypatch):
    _user_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "shared"))
    with tracking_session(_recipe(tmp_path)) as chosen:
        assert os.environ["WANDB_MODE"] == "disabled"
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
        assert os.environ["TRACKIO_DIR"] == str(tmp_path / "shared")
        # the file store's opt-in only with the file store ftune chose
        assert set(chosen) == {"WANDB_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"}


def test_only_the_named_trackers_are_set_up(tmp_path, monkeypatch):
    _user_environment(monkeypatch, tmp_path)
    with tracking_session(_recipe(tmp_path, "[mlflow]")) as chosen:
        assert chosen == {"MLFLOW_EXPERIMENT_NAME": "quickstart", "MLFLOW_ALLOW_FILE_STORE": "true",
                          "MLFLOW_TRACKING_URI": (tmp_path / "run" / "mlruns").resolve().as_uri()}
    with tracking_session(_recipe(tmp_path, "[]")) as chosen:
        assert chosen == {}
