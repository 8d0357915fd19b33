"""The synthesis runner end to end against a real local HTTP server that injects faults.

The server (``allava_jax.synth.fake_server``) runs uvicorn on 127.0.0.1 in a thread; the client is
the real ``openai`` SDK, in-process through ``main()`` or as a ``python -m allava_jax.synth``
subprocess where a test must kill it.
"""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allava_jax import storage
from allava_jax.storage import AppendLog
from allava_jax.synth.__main__ import main
from allava_jax.synth.fake_server import FakeServer, FakeState, Faults

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-0000"


def make_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + i % 7, 30), (i % 256, (7 * i) % 256, 90)).save(folder / f"img{i:04d}.jpg")
    return [f"img{i:04d}" for i in range(n)]


def read_journal(out: Path | str) -> list[dict]:
    if storage.is_remote(out):  # --out gs://...: the journal's parts, through AppendLog
        return AppendLog(f"{out}/journal.jsonl").read()
    if not (out / "journal.jsonl").exists():
        return []
    lines = (out / "journal.jsonl").read_bytes().split(b"\n")
    entries = []
    for ln in lines:
        try:
            entries.append(json.loads(ln))
        except json.JSONDecodeError:
            pass  # a torn last line
    return entries


def done_ids(out: Path) -> set[str]:
    return {e["id"] for e in read_journal(out) if e["k"] == "done"}


def outputs(out: Path | str) -> tuple[list[str], list[str], list[dict]]:
    out = storage.as_path(out)
    cap = [r["id"] for r in json.loads((out / "caption.json").read_text())]
    inst = [r["id"] for r in json.loads((out / "instruct.json").read_text())]
    fails = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    return cap, inst, fails


def cli_env(key: str = KEY) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(OPENAI_API_KEY=key, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def laion_args(images: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["laion", "--images", str(images), "--out", str(out), "--model", "gpt-4o", "--base-url", url,
            "--no-progress", *extra]


@pytest.fixture
def server():
    servers = []

    def start(**kw) -> FakeServer:
        s = FakeServer(FakeState(**kw)).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_200_items_with_20pct_transient_faults(tmp_path, server, monkeypatch, capsys):
    ids = make_images(tmp_path / "imgs", 200)
    poison = frozenset(random.Random(1).sample(ids, 6))
    srv = server(faults=Faults(rate=0.2, slow_s=2.0, poison=poison, seed=3))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    args = laion_args(tmp_path / "imgs", out, srv.url, "--concurrency", "32", "--timeout", "0.5",
                      "--max-retries", "6", "--max-attempts", "3")
    assert main(args) == 0
    st = srv.state
    assert all(st.faults_injected[k] > 0 for k in ("429", "500", "slow", "malformed")), st.faults_injected
    cap, inst, fails = outputs(out)
    # Every item exactly once, in the output or in the failures file with its reason; nothing lost.
    assert len(cap) == len(set(cap)) and cap == inst
    assert set(cap) | {f["id"] for f in fails} == set(ids) and not set(cap) & {f["id"] for f in fails}
    assert {f["id"] for f in fails} == poison
    for f in fails:
        assert "unusable output after 3 attempts" in f["reason"] and f["raw"]
    assert all(st.counts[i] >= 3 for i in poison)
    records = json.loads((out / "instruct.json").read_text())
    assert all(r["conversations"][0]["value"].startswith("<image>\n") and r["image"].endswith(".jpg") for r in records)
    # Tokens are summed from the responses: exactly what the server reported for the responses received.
    journal = read_journal(out)
    resp_ids = [e["resp_id"] for e in journal if e.get("resp_id")]
    assert len(resp_ids) == len(set(resp_ids))
    server_prompt = sum(st.usage[r]["prompt_tokens"] for r in resp_ids)
    server_completion = sum(st.usage[r]["completion_tokens"] for r in resp_ids)
    summary = capsys.readouterr().out
    assert f"{server_prompt:,} prompt + {server_completion:,} completion tokens" in summary
    # Same command again: nothing finished (done or failed) is requested again; same outputs.
    before = dict(st.counts)
    assert main(args) == 0
    assert dict(st.counts) == before
    assert outputs(out) == (cap, inst, fails)


def _wait_then_kill(proc: subprocess.Popen, out: Path, n_done: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(done_ids(out)) >= n_done:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_kill_9_and_rerun(tmp_path, server, request, where):
    ids = make_images(tmp_path / "imgs", 80)
    srv = server(faults=Faults(rate=0.1, kinds=("429", "500", "malformed"), seed=5), latency=0.03)
    # On a bucket (the GCS emulator) the journal is an AppendLog; flushed at every entry here, so
    # the kill points below fall between uploads as they fall between writes locally.
    out = request.getfixturevalue("gcs").bucket() + "/out" if where == "gcs" else tmp_path / "out"
    extra = ("--journal-flush-s", "0") if where == "gcs" else ()
    cmd = [sys.executable, "-m", "allava_jax.synth",
           *laion_args(tmp_path / "imgs", out, srv.url, "--concurrency", "4", "--timeout", "5", *extra)]
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    finished, counts_at_kill = set(), {}  # what the previous round had finished, and its request counts
    for round_ in range(2):  # kill at a random point, then again while resuming
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_then_kill(proc, out, len(done_ids(out)) + rng.randint(1, 25))
        if round_ == 0 and where == "local":  # also simulate a kill in the middle of a journal write
            with open(out / "journal.jsonl", "ab") as f:
                f.write(b'{"k": "done", "id": "img0079", "result": {"answer": "tor')
        else:  # the killed resume did not ask again for what the first run had finished
            assert {i: srv.state.counts[i] for i in finished} == counts_at_kill, f"seed {seed}"
        finished = done_ids(out)
        assert 0 < len(finished) < len(ids), f"seed {seed}: kill point missed"
        counts_at_kill = {i: srv.state.counts[i] for i in finished}
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {i: srv.state.counts[i] for i in finished} == counts_at_kill, f"seed {seed}"
    cap, inst, fails = outputs(out)
    assert sorted(cap) == ids and cap == inst and not fails, f"seed {seed}"
    journal_done = [e["id"] for e in read_journal(out) if e["k"] == "done"]
    assert len(journal_done) == len(set(journal_done)) == len(ids)


def test_api_key_never_written(tmp_path, server):
    secret = "sk-proj-SENTINEL-7c1f0e9d2b4a"
    ids = make_images(tmp_path / "imgs", 24)
    srv = server(api_key=secret, faults=Faults(rate=0.4, kinds=("500", "malformed"), echo_key=True,
                                               poison=frozenset(ids[:3]), seed=2))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "allava_jax.synth",
           *laion_args(tmp_path / "imgs", out, srv.url, "--concurrency", "8", "--max-retries", "0", "-v")]
    proc = subprocess.run(cmd, env=cli_env(secret), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert srv.state.faults_injected["500"] > 0
    fails = outputs(out)[2]
    assert {f["id"] for f in fails} >= set(ids[:3])
    assert any("***" in (f["raw"] or "") for f in fails)  # the server did echo the key; it was masked
    assert any("***" in f["reason"] for f in fails if "api_error 500" in f["reason"])
    # A wrong key: the server's 401 echoes it; the error message must not.
    wrong = "sk-proj-WRONGKEY-55aa11bb22"
    bad = subprocess.run([*cmd[:-1], "--out", str(tmp_path / "out2")], env=cli_env(wrong), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "401" in bad.stderr
    texts = [proc.stdout, proc.stderr, bad.stdout, bad.stderr]
    texts += [p.read_text(errors="replace") for d in (out, tmp_path / "out2") for p in d.rglob("*") if p.is_file()]
    assert all(secret not in t and wrong not in t for t in texts)


def test_batch_round_trip_50(tmp_path, server, monkeypatch):
    ids = make_images(tmp_path / "imgs", 50)
    srv = server(faults=Faults(rate=0.2, seed=4), batch_delay=0.2)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    args = laion_args(tmp_path / "imgs", out, srv.url, "--batch", "--batch-size", "20", "--poll-interval", "0.05")
    assert main(args) == 0
    cap, inst, fails = outputs(out)
    assert sorted(cap) == ids and cap == inst and not fails
    st = srv.state
    assert not st.counts  # no online requests at all
    assert len(st.batches) >= 3 and st.faults_injected  # 3 first-round batches plus retry rounds
    bad = {}
    for e in read_journal(out):
        if e["k"] == "bad":
            bad[e["id"]] = bad.get(e["id"], 0) + 1
    assert bad  # malformed/errored lines happened and were re-submitted
    # Each item went into a batch once, plus once per unusable result; never after it was done.
    assert {i: st.batch_counts[i] for i in ids} == {i: 1 + bad.get(i, 0) for i in ids}
    assert all(b["status"] == "completed" for b in st.batches.values())
    journal = read_journal(out)
    assert all(e.get("cost", 0) >= 0 for e in journal) and sum(e["k"] == "batch_closed" for e in journal) == len(st.batches)


def test_batch_resumes_from_stored_ids(tmp_path, server):
    ids = make_images(tmp_path / "imgs", 30)
    srv = server(batch_delay=1.5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "allava_jax.synth", *laion_args(tmp_path / "imgs", out, srv.url, "--batch",
                                                                 "--batch-size", "10", "--poll-interval", "0.1")]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (out / "journal.jsonl").exists() and sum(e["k"] == "batch" for e in read_journal(out)) == 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(srv.state.batches) == 3
    # Simulate a crash between batches.create and journaling its id: drop the last "batch" line.
    lines = (out / "journal.jsonl").read_text().splitlines(keepends=True)
    last = max(i for i, ln in enumerate(lines) if json.loads(ln)["k"] == "batch")
    (out / "journal.jsonl").write_text("".join(lines[:last] + lines[last + 1 :]))
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(srv.state.batches) == 3  # polled and adopted the stored batches, created none
    assert all(srv.state.batch_counts[i] == 1 for i in ids)
    assert sorted(outputs(out)[0]) == ids


def test_dry_run_calls_nothing(tmp_path, server, monkeypatch, capsys):
    make_images(tmp_path / "imgs", 12)
    srv = server()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # not needed for a dry run
    assert main(laion_args(tmp_path / "imgs", tmp_path / "out", srv.url, "--dry-run")) == 0
    line = capsys.readouterr().out
    assert "dry run: 12 requests" in line and "estimated cost $" in line
    assert not srv.state.counts and not (tmp_path / "out" / "caption.json").exists()


def test_max_cost_stops_cleanly_then_resume(tmp_path, server, monkeypatch, capsys):
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"idx": f"e{i}", "instruction": f"Explain topic {i}."}) + "\n" for i in range(40)))
    srv = server()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    base = ["text", "--questions", str(qs), "--out", str(out), "--model", "local", "--base-url", srv.url,
            "--no-progress", "--price-in", "100", "--price-out", "100", "--concurrency", "2"]
    assert main([*base, "--max-cost", "0.2"]) == 0  # about $0.012 per request here
    summary = capsys.readouterr().out
    assert "stopped: --max-cost" in summary
    spent = float(summary.split("cost $")[1].split(";")[0].split()[0])
    assert 0 < spent <= 0.2 * 1.05  # reservations keep in-flight requests inside the budget
    first = json.loads((out / "text.json").read_text())
    assert 0 < len(first) < 40
    assert read_journal(out) and all(r["conversations"][1]["value"] for r in first)
    counts = dict(srv.state.counts)
    assert main(base) == 0
    final = json.loads((out / "text.json").read_text())
    assert sorted(r["idx"] for r in final) == sorted(f"e{i}" for i in range(40))
    assert all(srv.state.counts[r["idx"]] == counts[r["idx"]] for r in first)


def test_vflan_mode_records(tmp_path, server, monkeypatch):
    make_images(tmp_path / "imgs", 6)
    recs = [{"id": f"vf{i}", "image": f"img{i:04d}.jpg", "instruction": f"How many objects are in region {i}?"}
            for i in range(6)]
    (tmp_path / "vflan.json").write_text(json.dumps(recs))
    srv = server()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    assert main(["vflan", "--records", str(tmp_path / "vflan.json"), "--image-root", str(tmp_path / "imgs"),
                 "--out", str(out), "--model", "gpt-4o", "--base-url", srv.url, "--no-progress"]) == 0
    inst = json.loads((out / "instruct.json").read_text())
    cap = json.loads((out / "caption.json").read_text())
    assert [r["id"] for r in inst] == [r["id"] for r in cap] == [r["id"] for r in recs]
    assert inst[2]["conversations"][0]["value"] == "<image>\nHow many objects are in region 2?"
    assert inst[2]["image"] == "img0002.jpg" and cap[2]["conversations"][1]["value"].startswith("The photo shows")
    # a VFLAN run directory is not resumed in another mode
    assert main(["text", "--questions", str(tmp_path / "vflan.json"), "--out", str(out), "--model", "m"]) == 1


def test_requests_per_minute_limit(tmp_path, server, monkeypatch):
    """--rpm through the whole pipeline, on a virtual clock that only the limiter's sleeps advance
    (so the figures do not depend on the machine's speed)."""
    from allava_jax.synth import limits, pipeline

    now, released = [0.0], []

    async def virtual_sleep(seconds: float) -> None:
        now[0] += seconds
        await asyncio.sleep(0)

    class RecordingLimiter(limits.RateLimiter):
        def __init__(self, rpm, tpm):
            super().__init__(rpm, tpm, clock=lambda: now[0], sleep=virtual_sleep)

        async def acquire(self, tokens: int = 0) -> None:
            await super().acquire(tokens)
            released.append(now[0])

    monkeypatch.setattr(pipeline, "RateLimiter", RecordingLimiter)
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"idx": i, "instruction": f"q{i}"}) + "\n" for i in range(16)))
    srv = server()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert main(["text", "--questions", str(qs), "--out", str(tmp_path / "out"), "--model", "m", "--base-url",
                 srv.url, "--no-progress", "--concurrency", "16", "--rpm", "600"]) == 0
    # 10 requests/s with a one-second bucket: a burst of 10, then one every 0.1 s.
    assert len(srv.state.arrivals) == 16
    np.testing.assert_allclose(sorted(released), [0.0] * 10 + [0.1 * k for k in range(1, 7)], atol=1e-9)
