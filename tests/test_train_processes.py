"""Trainer as separate processes: two-host jax.distributed, kill -9 + resume, SIGTERM."""

import json
import random
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

import train_fixtures
from allava_jax import storage
from allava_jax.train.metrics import read_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return train_fixtures.demo_dir(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return {row["step"]: row["loss"] for row in read_jsonl(workdir / "metrics.jsonl")}


# Every run here has the same length, so one compiled step serves the module (the learning-rate
# schedule, hence the program, depends on the total). 40 steps, so that a kill lands mid-run even
# when the async step-4 save commits late.
STEPS = 40
FLAGS = (f"--config.total_steps={STEPS}", "--config.checkpoint_every=4")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted single-process run (2 devices)."""
    work = tmp_path_factory.mktemp("reference")
    out = train_fixtures.run(train_fixtures.train_command(data_dir, work, *FLAGS), train_fixtures.subprocess_env(devices=2))
    assert out.returncode == 0, out.stderr[-3000:]
    return _losses(work)


def _start_two_processes(data_dir, workdir, port, *flags):
    procs = []
    for pid in range(2):
        cmd = train_fixtures.train_command(
            data_dir, workdir, *FLAGS, *flags,
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}",
        )
        procs.append(subprocess.Popen(cmd, env=train_fixtures.subprocess_env(devices=1), cwd=train_fixtures.ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_processes_agree_on_a_preemption_and_resume_with_the_losses_of_one(data_dir, tmp_path, reference):
    """SIGTERM to one of two jax.distributed processes: JAX's preemption notifier tells both, both
    save the same step and exit 0; the same command resumes. Losses equal a one-process run's."""
    work = tmp_path / "multi"
    procs = _start_two_processes(data_dir, work, _free_port(), "--config.checkpoint_every=1000")
    _wait_for_step(work, 3, procs[0])
    procs[1].send_signal(signal.SIGTERM)  # the process that writes no metrics: the other must learn of it
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "process 1 of 2" in outs[1][1]
    at = [int(err.split("preempted: checkpoint at step")[1].split()[0]) for _, err in outs]
    assert at[0] == at[1] and 3 <= at[0] < STEPS, at
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [at[0]]  # one checkpoint, at the step both processes agreed on

    procs = _start_two_processes(data_dir, work, _free_port(), "--config.checkpoint_every=1000")
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"step {at[0]}" in err.split("resuming from")[1].splitlines()[0]
    multi = _losses(work)
    assert sorted(multi) == sorted(reference)
    np.testing.assert_allclose([multi[s] for s in sorted(multi)], [reference[s] for s in sorted(reference)], rtol=1e-5)


def _wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``metrics.jsonl`` (local, or its flushed parts in a bucket) has a row of ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()[-3000:]}")
        if any(r["step"] >= step for r in read_jsonl(workdir / "metrics.jsonl")):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _committed_steps(workdir) -> list[int]:
    """Checkpoints orbax finished: renamed into place locally, marked committed in a bucket."""
    root = workdir / "checkpoints"
    remote = storage.is_remote(root)
    if remote:
        storage.reset_clients()  # gcsfs caches listings: see what the trainer wrote since
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (not remote or (p / "commit_success.txt").exists()))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The native-resolution side (tiny_ov15, packed images of several sizes): its data and one
    uninterrupted run."""
    data = train_fixtures.native_demo_dir(tmp_path_factory)
    work = tmp_path_factory.mktemp("reference_native")
    cmd = train_fixtures.train_command(data, work, *FLAGS, config_file=train_fixtures.NATIVE_CONFIG_FILE)
    out = train_fixtures.run(cmd, train_fixtures.subprocess_env(devices=2))
    assert out.returncode == 0, out.stderr[-3000:]
    return data, _losses(work)


# Locally with the native-resolution model (its pipeline's packing state under two budgets and
# its trained vision tower must resume too), in a bucket with the tiny CLIP one: both models and
# both storages at the cost of one extra reference run.
@pytest.mark.parametrize("where,model", [("local", "tiny_ov15"), ("gs", "tiny")])
def test_kill_9_then_rerun_resumes_with_identical_losses(data_dir, tmp_path, where, model, request):
    env = train_fixtures.subprocess_env(devices=2)
    config_file = train_fixtures.CONFIG_FILE
    if model == "tiny_ov15":
        data_dir, reference = request.getfixturevalue("native")
        config_file = train_fixtures.NATIVE_CONFIG_FILE
    else:
        reference = request.getfixturevalue("reference")
    if where == "gs":
        gcs = request.getfixturevalue("gcs")
        env.update(gcs.env)
        work = storage.as_path(gcs.bucket() + "/runs/killed")
    else:
        work = tmp_path / "killed"
    cmd = train_fixtures.train_command(data_dir, work, *FLAGS, config_file=config_file)
    kill_at = random.Random().randint(5, 20)  # a random step after the first checkpoint
    proc = subprocess.Popen(cmd, env=env, cwd=train_fixtures.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(work, kill_at, proc)
    # Saves are async: make sure one has committed before killing. Any step will do: with
    # keep_checkpoints the step-4 one may already be gone.
    deadline = time.time() + 60
    while not _committed_steps(work) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _losses(work)
    assert max(before) < STEPS

    out = train_fixtures.run(cmd, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr
    resumed_from = int(out.stderr.split("resuming from")[1].split("step")[1].split()[0])
    assert 4 <= resumed_from <= max(before)
    after = _losses(work)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):
        assert after[step] == reference[step], (step, after[step], reference[step])  # exactly equal
    if where == "gs":
        # The metrics object itself (compacted at the end) holds every step's row exactly once.
        rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert sorted(r["step"] for r in rows) == list(range(1, STEPS + 1))
        assert not (work / "metrics.jsonl.parts").exists() or not list((work / "metrics.jsonl.parts").iterdir())
        assert STEPS in _committed_steps(work)
        assert list((work / "tensorboard").glob("events.out.tfevents.*"))
        assert not (train_fixtures.ROOT / "gs:").exists() and not (tmp_path / "gs:").exists()


def test_sigterm_saves_and_exits_cleanly_then_resumes(data_dir, tmp_path):
    work = tmp_path / "preempted"
    # The signal lands mid-run (exact resume is the kill -9 test's job); no interval checkpoint.
    cmd = train_fixtures.train_command(data_dir, work, f"--config.total_steps={STEPS}", "--config.checkpoint_every=1000")
    env = train_fixtures.subprocess_env(devices=2)
    proc = subprocess.Popen(cmd, env=env, cwd=train_fixtures.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(work, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: checkpoint at step" in err
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < STEPS  # only the preemption checkpoint (interval is 1000)
    out = train_fixtures.run(cmd, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"step {saved[0]}" in out.stderr.split("resuming from")[1].splitlines()[0]
    assert sorted(_losses(work)) == list(range(1, STEPS + 1))
