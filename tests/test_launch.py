"""launch/tpu_pod.sh against a fake ``gcloud`` on PATH that records its arguments and fails on cue."""

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu_pod.sh"

# The fake: appends its argv (one line, tab-separated) to $FAKE_LOG; `describe` prints the next
# line of $FAKE_STATES (the last one once they run out); `ssh` of the training command exits with
# the next code of $FAKE_TRAIN_CODES (0 once they run out) and prints what a preempted run prints
# when that code is "preempted".
FAKE_GCLOUD = r'''#!/usr/bin/env bash
printf '%s\t' "$@" >> "$FAKE_LOG"; printf '\n' >> "$FAKE_LOG"
next() {  # pop the first line of file $1 (keep the last)
  local first; first=$(head -n 1 "$1")
  if [ "$(wc -l < "$1")" -gt 1 ]; then tail -n +2 "$1" > "$1.tmp" && mv "$1.tmp" "$1"; fi
  echo "$first"
}
case " $* " in
  *" describe "*) next "$FAKE_STATES" ;;
  *"allava_jax.train"*)
    code=$(next "$FAKE_TRAIN_CODES")
    if [ "$code" = preempted ]; then echo "WARNING preempted: checkpoint at step 7 saved"; exit 0; fi
    exit "$code" ;;
esac
exit 0
'''


def _run(tmp_path, states, train_codes, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    (tmp_path / "codes").write_text("\n".join(train_codes) + "\n")
    log = tmp_path / "gcloud.log"
    log.write_text("")
    full_env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
        "FAKE_STATES": str(tmp_path / "states"), "FAKE_TRAIN_CODES": str(tmp_path / "codes"),
        "TPU": "pod", "ZONE": "us-central2-b", "DATA": "gs://b/data", "INIT": "gs://b/init",
        "WORKDIR": "gs://b/runs/s1", "RETRY_WAIT_S": "0", **env,
    }
    out = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    calls = [line.split("\t")[:-1] for line in log.read_text().splitlines()]
    return out, calls


def _kind(call):
    """'scp', 'install', 'train', 'describe', 'create', 'delete'."""
    verb = call[3]
    if verb == "ssh":
        return "train" if any("allava_jax.train" in a for a in call) else "install"
    return verb


def test_installs_on_every_worker_before_the_first_run(tmp_path):
    out, calls = _run(tmp_path, ["READY"], ["0"], "--config.total_steps=10")
    assert out.returncode == 0, out.stderr
    kinds = [_kind(c) for c in calls]
    assert kinds[:3] == ["scp", "install", "train"], kinds
    assert all("--worker=all" in c for c in calls if _kind(c) in ("scp", "install", "train"))
    install = next(c for c in calls if _kind(c) == "install")
    assert any("pip install -q -r requirements.txt" in a for a in install)
    train = next(c for c in calls if _kind(c) == "train")
    command = next(a for a in train if "allava_jax.train" in a)
    assert "--workdir gs://b/runs/s1" in command and "--config.total_steps=10" in command
    assert kinds.count("train") == 1


def test_retries_after_a_failure_and_a_preemption_with_the_same_workdir(tmp_path):
    # run 1 dies (ssh 255) while the slice is PREEMPTED; it is recreated; run 2 saves a preemption
    # checkpoint and exits 0; run 3 finishes.
    out, calls = _run(tmp_path, ["PREEMPTED", "CREATING", "READY", "READY", "READY"], ["255", "preempted", "0"],
                      "--retries", "3", ACCELERATOR_TYPE="v5litepod-16", RUNTIME_VERSION="v2-alpha-tpuv5-lite", SPOT="1")
    assert out.returncode == 0, out.stderr
    kinds = [_kind(c) for c in calls]
    assert kinds.count("train") == 3, kinds
    assert kinds.count("install") == 3  # every attempt reinstalls: a recreated slice is bare
    assert "delete" in kinds and "create" in kinds
    create = next(c for c in calls if _kind(c) == "create")
    assert "--spot" in create and "v5litepod-16" in create
    assert kinds.index("create") < [i for i, k in enumerate(kinds) if k == "train"][1]
    commands = {next(a for a in c if "allava_jax.train" in a) for c in calls if _kind(c) == "train"}
    assert len(commands) == 1  # the same command every time: it resumes from the workdir


def test_gives_up_when_no_retries_are_left(tmp_path):
    out, calls = _run(tmp_path, ["READY"], ["3", "3", "3"], "--retries=1")
    assert out.returncode == 3
    assert [_kind(c) for c in calls].count("train") == 2
    assert "no retries are left" in out.stderr
