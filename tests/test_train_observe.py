"""Where a run's time goes and what it keeps: time-based checkpoints, the profile window, step
time and input wait in the metrics, the hang watchdog, Weights & Biases (offline)."""

import dataclasses
import datetime
import gzip
import json
import logging
import struct

import pytest

import train_fixtures
from allava_jax.train import checkpoint as ckpt
from allava_jax.train.loop import train
from allava_jax.train.metrics import read_jsonl
from allava_jax.train.watchdog import HangWatchdog


@dataclasses.dataclass
class _Info:
    step: int
    time: datetime.datetime = datetime.datetime(2026, 1, 1)
    metrics: dict | None = None


def _kept(policy, steps):
    return [s for s, keep in zip(steps, policy.should_preserve([_Info(s) for s in steps], context=None)) if keep]


def test_temporary_checkpoints_last_until_the_next_save():
    policy = ckpt.KeepPermanent(every=10, keep=2, last_step=35)
    assert _kept(policy, [10, 13]) == [10, 13]  # 13 (time-based) is the newest: kept
    assert _kept(policy, [10, 13, 16]) == [10, 16]  # replaced by the next save
    assert _kept(policy, [10, 16, 20]) == [10, 20]
    assert _kept(policy, [10, 20, 24, 30]) == [20, 30]  # the newest 2 permanent ones
    assert _kept(policy, [20, 30, 35]) == [30, 35]  # the last step is permanent
    assert _kept(ckpt.KeepPermanent(every=10, keep=0, last_step=35), [10, 13, 20, 30, 31]) == [10, 20, 30, 31]


class _FakeClock:
    """Advances ``tick`` seconds per reading: every logged step looks long to the loop."""

    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return train_fixtures.demo_dir(tmp_path_factory)


def test_a_run_with_time_based_checkpoints_a_profile_window_and_wandb(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    saved = []
    real_save = ckpt.save

    def spy(mngr, step, *args):
        saved.append(step)
        return real_save(mngr, step, *args)

    monkeypatch.setattr(ckpt, "save", spy)
    cfg = train_fixtures.config(
        data_dir, total_steps=10, checkpoint_every=4, keep_checkpoints=2, log_every=2,
        checkpoint_every_minutes=1.0, hang_timeout_s=0.0,
    )
    cfg.profile.start_step, cfg.profile.num_steps = 3, 2
    cfg.wandb.project = "allava-test"
    work = tmp_path / "run"
    train(cfg, work, clock=_FakeClock(tick=40.0))

    # Time-based saves land on log steps (2, 6) beside the permanent ones (4, 8, 10); each
    # temporary one is gone once a later one is saved.
    assert saved == [2, 4, 6, 8, 10]
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [8, 10]

    rows = read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    for r in rows:
        assert r["step_time_s"] > 0 and 0 <= r["input_wait_fraction"] <= 1
        assert "memory_in_use_gib" not in r  # the CPU backend reports no device memory

    traces = list((work / "profile").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1
    events = json.load(gzip.open(traces[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = sorted({int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})})
    assert steps == [3, 4]
    assert list((work / "profile").rglob("*.xplane.pb"))  # what XProf / TensorBoard read

    runs = list((tmp_path / "wandb").rglob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    assert [h["_step"] for h in history] == [2, 4, 6, 8, 10]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows])
    assert history[0]["input_wait_fraction"] == pytest.approx(rows[0]["input_wait_fraction"])


def _wandb_history(path):
    """The history rows of an offline ``.wandb`` file. wandb 0.31 reads these in its Go core only,
    so the file is read here: a 7-byte header, then LevelDB log records (32 KiB blocks, each record
    a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) holding ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, partial = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        partial = payload if kind in (1, 2) else partial + payload
        if kind in (1, 4):
            records.append(partial)
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return history


def _busy_function_the_stack_names(watchdog):
    return watchdog.check()


def test_the_watchdog_logs_every_stack_once_per_stall(caplog):
    clock = _FakeClock(tick=0.0)
    watchdog = HangWatchdog(timeout_s=60.0, clock=clock)
    watchdog.beat(5)
    clock.now += 59
    assert not watchdog.check()
    clock.now += 2
    with caplog.at_level(logging.ERROR, logger="allava_jax.train"):
        assert _busy_function_the_stack_names(watchdog)
    text = caplog.text
    assert "no step finished for 61 s after step 5" in text
    assert "_busy_function_the_stack_names" in text and "MainThread" in text
    assert not watchdog.check()  # once per stall
    watchdog.beat(6)
    clock.now += 61
    assert watchdog.check() and watchdog.fired_count == 2
    assert not HangWatchdog(timeout_s=0.0, clock=clock).check()  # 0 = off
