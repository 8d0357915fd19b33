"""allava_jax.storage against the GCS emulator (tests/gcs_fixtures.py): append-only logs that survive
kill -9, fast errors for a bad bucket, and local copies of remote directories."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from allava_jax import storage
from allava_jax.errors import UserError
from allava_jax.storage import AppendLog
from cli_env import ROOT


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def parts(uri: str) -> list[str]:
    fs, key = storage.filesystem(uri + ".parts")
    fs.invalidate_cache(key)
    return sorted(Path(p).name for p in fs.ls(key, detail=False)) if fs.exists(key) else []


def test_local_log_append_flush_read_and_torn_line(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    with AppendLog(path) as log:
        for i in range(3):
            log.append({"i": i, "s": "é"})
        # Appends reach the file at once (a kill -9 of this process keeps them).
        assert [json.loads(ln)["i"] for ln in path.read_text().splitlines()] == [0, 1, 2]
    with open(path, "ab") as f:
        f.write(b'{"i": 3, "s": "tor')  # killed mid-write
    log = AppendLog(path)
    assert [r["i"] for r in log.read()] == [0, 1, 2]
    log.append({"i": 3})  # cuts the torn line first
    log.close()
    assert [json.loads(ln)["i"] for ln in path.read_text().splitlines()] == [0, 1, 2, 3]
    log = AppendLog(path)
    log.compact([{"i": 0}])
    log.append({"i": 1})
    assert log.read() == [{"i": 0}, {"i": 1}]


def test_local_log_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(UserError, match=r"log.jsonl: line 2 is not JSON"):
        AppendLog(path).read()


def test_remote_log_flushes_on_its_clock_one_new_object_each(gcs):
    uri = gcs.bucket() + "/run/metrics.jsonl"
    clock = Clock()
    log = AppendLog(uri, flush_every_s=30.0, clock=clock)
    log.append({"step": 1})
    log.append({"step": 2})
    assert parts(uri) == []  # not due yet: nothing uploaded
    clock.t = 30.0
    log.append({"step": 3})  # due: rows 1-3 become one object
    assert len(parts(uri)) == 1
    clock.t = 45.0
    log.append({"step": 4})
    assert len(parts(uri)) == 1
    log.close()
    names = parts(uri)
    assert len(names) == 2 and names[0].startswith("0000000000-") and names[1].startswith("0000000001-")
    assert [r["step"] for r in AppendLog(uri).read()] == [1, 2, 3, 4]
    assert not storage.as_path(uri).exists()  # no base object before a compaction


WRITER = """
import sys
from allava_jax.storage import AppendLog
uri, start, per_flush = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
log = AppendLog(uri, flush_every_s=1e9)
i = start
while True:
    log.append({"i": i, "pad": "x" * 50})
    i += 1
    if i % per_flush == 0:
        log.flush()
        print(i, flush=True)
"""


def _run_and_kill(uri: str, start: int, flushes: int, env: dict) -> int:
    """Start a writer, kill -9 it after it reported ``flushes`` flushes; the last row it reported."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri, str(start), "7"], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    reported = [int(proc.stdout.readline()) for _ in range(flushes)]
    proc.kill()
    proc.wait()
    proc.stdout.close()
    return reported[-1]


def test_remote_log_keeps_every_flushed_row_once_across_kill_9_and_compacts(gcs):
    uri = gcs.bucket() + "/run/journal.jsonl"
    reported = _run_and_kill(uri, 0, 3, gcs.env)
    rows = [r["i"] for r in AppendLog(uri).read()]
    # Every flush it reported is there; a flush it made after the last report may be too; the rows
    # it appended after its last flush are not (never half of a flush).
    assert rows == list(range(len(rows))) and len(rows) >= reported and len(rows) % 7 == 0
    # The same command resumes after the last durable row, killed again.
    reported = _run_and_kill(uri, len(rows), 2, gcs.env)
    rows = [r["i"] for r in AppendLog(uri).read()]
    assert rows == list(range(len(rows))) and len(rows) >= reported
    seqs = [int(n.split("-")[0]) for n in parts(uri)]
    assert seqs == list(range(len(seqs)))  # the second writer numbered its parts after the first's
    log = AppendLog(uri)
    log.compact()
    assert parts(uri) == [] and [r["i"] for r in AppendLog(uri).read()] == rows
    log.append({"i": len(rows)})
    log.close()
    assert [r["i"] for r in AppendLog(uri).read()] == list(range(len(rows) + 1))
    # compact(rows): what a resume kept; later rows follow it.
    log = AppendLog(uri)
    log.compact([{"i": 0}, {"i": 1}])
    log.append({"i": 2})
    log.close()
    assert AppendLog(uri).read() == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [json.loads(ln) for ln in storage.as_path(uri).read_text().splitlines()] == [{"i": 0}, {"i": 1}]


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", ["base", "parts", "marker"])
def test_remote_compaction_killed_half_way_reads_back_once(gcs, monkeypatch, kill_at):
    uri = gcs.bucket() + "/log.jsonl"
    log = AppendLog(uri, flush_every_s=0)
    for i in range(4):
        log.append({"i": i})
    fs = log._fs
    real_pipe, real_rm, real_rm_file = fs.pipe_file, fs.rm, fs.rm_file

    def pipe_file(path, data, **kw):
        if kill_at == "base" and path == log._key:
            raise Killed
        return real_pipe(path, data, **kw)

    def rm(paths, **kw):
        if kill_at == "parts":
            real_rm(paths[:1], **kw)  # one part deleted, then killed
            raise Killed
        return real_rm(paths, **kw)

    def rm_file(path, **kw):
        if kill_at == "marker":
            raise Killed
        return real_rm_file(path, **kw)

    with monkeypatch.context() as patched:
        patched.setattr(fs, "pipe_file", pipe_file)
        patched.setattr(fs, "rm", rm)
        patched.setattr(fs, "rm_file", rm_file)
        with pytest.raises(Killed):
            log.compact([{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}, {"i": 4}])
    expected = list(range(4)) if kill_at == "base" else list(range(5))
    fresh = AppendLog(uri, flush_every_s=0)
    assert [r["i"] for r in fresh.read()] == expected
    fresh.append({"i": len(expected)})
    fresh.compact()
    assert [r["i"] for r in AppendLog(uri).read()] == [*expected, len(expected)]
    assert parts(uri) == []


def test_check_access_names_a_missing_bucket(gcs):
    gcs.bucket()  # the emulator holds other buckets, not this one
    with pytest.raises(UserError, match=r"^gs://no-such-bucket-x1/run: bucket gs://no-such-bucket-x1 does not exist"):
        storage.check_access("gs://no-such-bucket-x1/run", write=True)
    storage.check_access(gcs.bucket() + "/run", write=True)


def test_check_access_names_an_unreachable_endpoint(gcs, monkeypatch):
    bucket = gcs.bucket()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # discard port: nothing listens
    storage.reset_clients()
    with pytest.raises(UserError, match=rf"^{bucket}/x: cannot reach the storage endpoint http://127.0.0.1:9"):
        storage.check_access(bucket + "/x")


def test_check_access_local(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        storage.check_access(tmp_path / "file" / "out", write=True)
    storage.check_access(tmp_path / "file", write=True)  # an output file that will be replaced
    storage.check_access(tmp_path / "new" / "out", write=True)
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_upload_dir_then_local_dir_round_trip(gcs, tmp_path, monkeypatch):
    src = tmp_path / "tok"
    (src / "sub").mkdir(parents=True)
    (src / "tokenizer.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(bytes(range(256)) * 40)
    remote = gcs.bucket() + "/ckpt/tokenizer"
    storage.upload_dir(src, remote)
    assert storage.as_path(remote + "/sub/w.bin").read_bytes() == (src / "sub" / "w.bin").read_bytes()
    monkeypatch.setenv("ALLAVA_CACHE", str(tmp_path / "cache"))
    local = storage.local_dir(remote)
    assert local.is_relative_to(tmp_path / "cache" / "remote")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert files == ["sub/w.bin", "tokenizer.json"]
    assert (local / "sub" / "w.bin").read_bytes() == (src / "sub" / "w.bin").read_bytes()
    # Downloaded once: a cached file of the remote size is kept as it is; one of another size is fetched.
    (local / "tokenizer.json").write_text('{"b": 2}')
    (local / "sub" / "w.bin").write_bytes(b"short")
    assert storage.local_dir(remote) == local
    assert (local / "tokenizer.json").read_text() == '{"b": 2}'
    assert (local / "sub" / "w.bin").read_bytes() == (src / "sub" / "w.bin").read_bytes()
    assert storage.local_dir(src) == src
    with pytest.raises(UserError, match="no such directory"):
        storage.local_dir(remote + "-missing")


def test_paths_and_remote_detection(gcs):
    bucket = gcs.bucket()
    p = storage.as_path(bucket) / "a" / "b.txt"
    assert str(p) == f"{bucket}/a/b.txt" and storage.is_remote(p) and storage.is_remote(str(p))
    assert not storage.is_remote("/tmp/x") and not storage.is_remote(Path("rel/gs:/x"))
    p.write_text("hi")
    assert p.exists() and p.read_text() == "hi" and [q.name for q in p.parent.iterdir()] == ["b.txt"]


def test_atomic_write_to_a_bucket(gcs):
    import numpy as np

    from allava_jax.files import atomic_save_npy, atomic_write, remove_partial_writes

    out = gcs.bucket() + "/out"
    atomic_write(out + "/a.json", '{"x": 1}')
    atomic_write(out + "/a.json", b'{"x": 2}')  # replaces the object
    atomic_save_npy(out + "/e.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    with storage.as_path(out + "/e.npy").open("rb") as f:
        assert np.load(f).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert storage.as_path(out + "/a.json").read_text() == '{"x": 2}'
    assert sorted(p.name for p in storage.as_path(out).iterdir()) == ["a.json", "e.npy"]
    assert remove_partial_writes(out) == 0
