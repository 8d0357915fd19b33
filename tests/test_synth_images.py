"""Images mode (SynthVLM's caption -> image step) end to end against the fault-injecting fake server.

The client is the real ``openai`` SDK, in-process through ``main()``, or a ``python -m
allava_jax.synth`` subprocess where the test must kill it.
"""

import asyncio
import base64
import contextlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from openai.types import ImagesResponse
from PIL import Image, ImageFile
from test_synth_e2e import _wait_then_kill, cli_env, read_journal

from allava_jax.synth import prompts as P
from allava_jax.synth.__main__ import main
from allava_jax.synth.config import SynthConfig
from allava_jax.synth.fake_server import FakeServer, FakeState, Faults, fake_png
from allava_jax.synth.images import ImageWork, safe_id
from allava_jax.synth.items import Item, captions_from_file
from allava_jax.synth.journal import Journal
from allava_jax.synth.redact import register_secret
from allava_jax.synth.usage import load_image_price

KEY = "sk-test-images-0000"


@pytest.fixture
def fake_api():
    """Starts fake servers (``fake_api(**FakeState fields)``); all stop at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(FakeServer(FakeState(**kw)))


def write_captions(path: Path, n: int) -> list[str]:
    ids = [f"cap/{i:03d}" for i in range(n)]  # a "/" so that file names must be made safe
    path.write_text("".join(json.dumps({"id": c, "caption": f"A red bicycle against a white wall, view {i}."}) + "\n"
                            for i, c in enumerate(ids)))
    return ids


def done_ids(out: Path) -> list[str]:
    """Done entries in journal order (a list, so that a caption done twice would show)."""
    return [e["id"] for e in read_journal(out) if e["k"] == "done"]


def images_args(captions: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["images", "--captions", str(captions), "--out", str(out), "--model", "sdxl", "--base-url", url,
            "--no-progress", *extra]


def check_records(out: Path, ids: list[str], n: int) -> list[dict]:
    """images.json holds n records per caption in input order, each pointing at an image PIL opens."""
    records = json.loads((out / "images.json").read_text())
    assert [r["caption_id"] for r in records] == [i for i in ids for _ in range(n)]
    assert [r["id"] for r in records] == [f"{i}_{k}" for i in ids for k in range(n)]
    for r in records:
        with Image.open(out / r["image"]) as im:
            im.load()
    # Exactly the referenced files: nothing from spoilt answers, no temporary files left.
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["image"]).name for r in records)
    return records


def test_30_captions_with_transient_faults(tmp_path, fake_api, monkeypatch, capsys):
    ids = write_captions(tmp_path / "caps.jsonl", 30)
    # The client timeout must be far above a normal answer's time even on a loaded machine: a
    # malformed answer that arrived after it would be injected but never received.
    srv = fake_api(faults=Faults(rate=0.25, slow_s=6.0, seed=11))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    args = images_args(tmp_path / "caps.jsonl", out, srv.url, "--n", "3", "--concurrency", "8", "--timeout", "3",
                       "--max-retries", "6", "--max-attempts", "3", "--price-image", "0.01")
    assert main(args) == 0
    st = srv.state
    assert all(st.faults_injected[k] > 0 for k in ("429", "500", "slow", "malformed")), st.faults_injected
    entries = read_journal(out)
    assert sorted(done_ids(out)) == ids  # every caption done exactly once
    assert sum(e["k"] == "bad" for e in entries) == st.faults_injected["malformed"]  # each spoilt answer cost an attempt
    records = check_records(out, ids, 3)
    assert records[0]["conversations"] == [
        {"from": "human", "value": "<image>\n" + P.caption_instruction(P.load_prompts(), 0, ids[0])},
        {"from": "gpt", "value": "A red bicycle against a white wall, view 0."}]
    assert (out / "failures.jsonl").read_text() == ""
    # Cost is per image received, spoilt answers included (answers that came after the client's
    # timeout were never received); the summary counts them all.
    answers = [e for e in entries if e["k"] in ("done", "bad")]
    received = sum(e["n_images"] for e in answers)
    assert received <= sum(st.images_delivered.values()) <= received + 3 * st.faults_injected["slow"]
    assert sum(e["cost"] for e in answers) == pytest.approx(0.01 * received)
    summary = capsys.readouterr().out
    assert f"{len(answers)} paid responses, {received} images, cost ${0.01 * received:.4f}" in summary
    # Same command again: nothing is requested again and the outputs stay the same.
    before, text = dict(st.counts), (out / "images.json").read_text()
    assert main(args) == 0
    assert dict(st.counts) == before and (out / "images.json").read_text() == text


def test_kill_9_and_rerun_never_leaks_the_key(tmp_path, fake_api):
    secret = "sk-proj-IMAGES-SENTINEL-3e9b71"
    ids = write_captions(tmp_path / "caps.jsonl", 40)
    poison = frozenset(random.Random(2).sample(ids, 2))
    srv = fake_api(api_key=secret, latency=0.03, faults=Faults(rate=0.15, kinds=("429", "500", "malformed"),
                                                             echo_key=True, poison=poison, seed=7))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "allava_jax.synth",
           *images_args(tmp_path / "caps.jsonl", out, srv.url, "--n", "2", "--concurrency", "4", "--timeout", "5",
                        "--max-retries", "3", "-v")]
    env = cli_env(secret)
    seed = random.randrange(10**6)
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        _wait_then_kill(proc, out, random.Random(seed).randint(3, 20))
    finished = set(done_ids(out))
    assert 0 < len(finished) < len(ids), f"seed {seed}: kill point missed"
    counts_at_kill = {i: srv.state.counts[i] for i in finished}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert {i: srv.state.counts[i] for i in finished} == counts_at_kill, f"seed {seed}"
    done = done_ids(out)
    fails = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert len(done) == len(set(done)) and {f["id"] for f in fails} == poison and not set(done) & poison
    assert sorted(set(done) | poison) == ids
    assert all(f["reason"].startswith("unusable output after 3 attempts; last: ") for f in fails)
    check_records(out, [i for i in ids if i not in poison], 2)
    # The server echoed the key into error bodies and spoilt images; it reached no file and no stream.
    texts = [(tmp_path / "killed.log").read_bytes(), rerun.stdout.encode(), rerun.stderr.encode()]
    texts += [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    assert not [t for t in texts if secret.encode() in t]
    assert b"***" in (out / "journal.jsonl").read_bytes()


def test_a_rerun_removes_the_image_files_a_kill_left_half_written(tmp_path, fake_api, monkeypatch):
    """A kill between an image's temporary write and its rename leaves the temporary file (the
    kill -9 test lands there only by chance): the rerun deletes it and keeps the finished images."""
    ids = write_captions(tmp_path / "caps.jsonl", 4)
    srv = fake_api()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    args = images_args(tmp_path / "caps.jsonl", out, srv.url, "--n", "2")
    assert main([*args, "--limit", "2"]) == 0
    finished = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    assert len(finished) == 4
    for name in (f"{safe_id(ids[2])}_0.png.tmp4242", f"{safe_id(ids[0])}_1.png.tmp17"):
        (out / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n half")
    assert main(args) == 0
    check_records(out, ids, 2)  # exactly the referenced files
    assert all((out / "images" / name).read_bytes() == blob for name, blob in finished.items())
    assert all(srv.state.counts[i] == 1 for i in ids)


def test_url_answers_are_fetched_with_the_key_from_the_same_server(tmp_path, fake_api, monkeypatch):
    ids = write_captions(tmp_path / "caps.jsonl", 8)
    srv = fake_api(api_key=KEY, faults=Faults(rate=0.3, kinds=("malformed",), seed=3))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    args = images_args(tmp_path / "caps.jsonl", out, srv.url, "--n", "2", "--response-format", "url",
                       "--concurrency", "1")  # one request at a time: the same faults on every run
    assert main(args) == 0
    records = check_records(out, ids, 2)
    st = srv.state
    assert st.faults_injected["malformed"] > 0 and any(n.startswith("missing-") for n in st.image_fetches)
    assert all(st.image_fetches[n] == 1 for n in st.image_files if st.image_fetches[n])  # fetched once each
    served = set(st.image_files.values())
    assert all((out / r["image"]).read_bytes() in served for r in records)  # the bytes as the server sent them


def test_dry_run_calls_nothing_and_prices_per_image(tmp_path, fake_api, monkeypatch, capsys):
    write_captions(tmp_path / "caps.jsonl", 10)
    srv = fake_api()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # not needed for a dry run
    args = images_args(tmp_path / "caps.jsonl", tmp_path / "out", srv.url, "--n", "2", "--dry-run")
    args[args.index("sdxl")] = "dall-e-2-beta"  # the table's "dall-e-2" entry: $0.02 per image
    assert main(args) == 0
    assert "dry run: 10 requests for 20 images (0 captions already finished); estimated cost $0.4000" in \
        capsys.readouterr().out
    assert main([*images_args(tmp_path / "caps.jsonl", tmp_path / "out2", srv.url, "--dry-run")]) == 0
    assert "50 images" in (line := capsys.readouterr().out) and "unknown (no price: pass --price-image)" in line
    assert not srv.state.counts and not (tmp_path / "out" / "images.json").exists()


def test_max_cost_stops_cleanly_then_resumes(tmp_path, fake_api, monkeypatch, capsys):
    ids = write_captions(tmp_path / "caps.jsonl", 12)
    srv = fake_api(latency=0.02)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    base = images_args(tmp_path / "caps.jsonl", out, srv.url, "--n", "2", "--price-image", "0.01",
                       "--concurrency", "3")
    assert main([*base, "--max-cost", "0.11"]) == 0  # $0.02 a request: five fit, with those in flight
    summary = capsys.readouterr().out
    assert "stopped: --max-cost $0.11 reached" in summary and "10 images, cost $0.1000" in summary
    first = done_ids(out)
    assert len(first) == 5 and len(json.loads((out / "images.json").read_text())) == 10
    counts = dict(srv.state.counts)
    assert main(base) == 0
    assert sorted(done_ids(out)) == ids and all(srv.state.counts[i] == counts[i] for i in first)
    check_records(out, ids, 2)


def test_allava_caption_records_as_input(tmp_path, fake_api, monkeypatch):
    recs = [{"id": f"laion_{i}", "image": f"allava_laion/images/{i}.jpeg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."},
        {"from": "gpt", "value": f"  A lighthouse on a cliff at dusk, variant {i}.\n"}]} for i in range(4)]
    (tmp_path / "caption.json").write_text(json.dumps(recs))
    srv = fake_api()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "out"
    assert main(images_args(tmp_path / "caption.json", out, srv.url, "--n", "1", "--seed", "7")) == 0
    records = check_records(out, [r["id"] for r in recs], 1)
    prompts = P.load_prompts()
    for rec, out_rec in zip(recs, records):
        assert out_rec["image"] == f"images/{rec['id']}_0.png"
        assert out_rec["conversations"] == [
            {"from": "human", "value": "<image>\n" + P.caption_instruction(prompts, 7, rec["id"])},
            {"from": "gpt", "value": rec["conversations"][1]["value"].strip()}]
    # An images run directory is not resumed in a chat mode, nor the other way round.
    assert main(["text", "--questions", str(tmp_path / "caption.json"), "--out", str(out), "--model", "m"]) == 1


def test_caption_inputs_and_their_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "ok.jsonl").write_text('{"id": 1, "caption": "a cat"}\n\n{"id": "b", "conversations": '
                                       '[{"from": "human", "value": "x"}, {"from": "gpt", "value": "a dog"}]}\n')
    assert [(it.id, it.instruction) for it in captions_from_file(tmp_path / "ok.jsonl")] == [("1", "a cat"),
                                                                                                ("b", "a dog")]
    bad = {"dup.jsonl": ('{"id": "a", "caption": "x"}\n{"id": "b", "caption": "y"}\n{"id": "a", "caption": "z"}\n',
                         "duplicate item id 'a' in {path}: records 0 and 2"),
           "nocap.json": (json.dumps([{"id": "a", "caption": "x"}, {"id": "b", "conversations": [
               {"from": "human", "value": "<image>\nDescribe."}]}]), "{path}: record 1 (id 'b') has no caption"),
           "noid.jsonl": ('{"caption": "x"}\n', "{path}: record 0 has no id"),
           "torn.jsonl": ('{"id": "a", "caption": "x"}\n{"id": "b", "capt\n', "{path}: line 2 is not valid JSON")}
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        assert main(images_args(tmp_path / name, tmp_path / "out", "http://127.0.0.1:9/v1")) == 1
        assert message.format(path=tmp_path / name) in capsys.readouterr().err, name
    assert main(images_args(tmp_path / "ok.jsonl", tmp_path / "out", "http://127.0.0.1:9/v1", "--batch")) == 1
    assert "--batch: the Batch API route serves the chat modes only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_file_names_and_image_prices(tmp_path):
    assert safe_id("laion_12") == "laion_12"
    assert safe_id("a/b") != safe_id("a_b") and safe_id("a/b").startswith("a_b-")
    assert safe_id("..") != ".." and "/" not in safe_id("../../etc/passwd")
    assert load_image_price("gpt-image-1-mini") == 0.011 and load_image_price("gpt-image-1") == 0.042
    assert load_image_price("dall-e-3-2024") == 0.04 and load_image_price("sdxl") is None
    assert load_image_price("sdxl", price_image=0.003) == 0.003
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"images": {"_comment": "x", "sd3": 0.001}}))
    assert load_image_price("sd3-medium", table) == 0.001 and load_image_price("_comment", table) is None


def test_every_kind_of_unusable_answer_costs_an_attempt_and_writes_nothing(tmp_path, monkeypatch):
    # As lmms-eval and tensorflow-datasets leave it process-wide: truncated files must still fail.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    secret = "sk-proj-PNG-ECHO-5d2c90"
    register_secret(secret)
    png = fake_png((8, 6), random.Random(0))
    b64 = base64.b64encode(png).decode()

    def enc(data: bytes) -> str:
        return base64.b64encode(data).decode()

    answers = {"image 1: not valid base64": [b64, "%% not base64 %%"],
               "image 1: not an image PIL can open": [b64, enc(b"GIF89a, or so it says")],
               "image 0: not an image PIL can open": [enc(png[: len(png) // 2]), b64],  # truncated
               "expected 2 images, got 1": [b64],
               "image 1: its bytes hold the API key": [b64, enc(fake_png((8, 6), random.Random(1), {"a": secret}))]}
    item = Item(id="x", instruction="A cat on a mat.")
    with Journal(tmp_path / "journal.jsonl") as j:
        work = ImageWork(SynthConfig(mode="images", out=tmp_path, model="m", n=2), P.load_prompts(), j, 0.5)
        for expected, data in answers.items():
            reason, _ = asyncio.run(work.receive(None, item, ImagesResponse(created=0, data=[{"b64_json": d}
                                                                                             for d in data])))
            assert reason.startswith(expected), (expected, reason)
        assert not (tmp_path / "images").exists()
        assert j.state.bad["x"] == 5 and j.state.totals.images == 9 and j.state.totals.cost == pytest.approx(4.5)
        # A data: URL answer is decoded in place; images beyond n are paid for but not kept.
        data = [{"url": "data:image/png;base64," + b64}, {"b64_json": b64}, {"b64_json": b64}]
        assert asyncio.run(work.receive(None, item, ImagesResponse(created=0, data=data))) == (None, None)
        assert j.state.done["x"]["result"]["images"] == ["images/x_0.png", "images/x_1.png"]
        assert j.state.done["x"]["cost"] == pytest.approx(1.5)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["x_0.png", "x_1.png"]
    assert (tmp_path / "images" / "x_0.png").read_bytes() == png
