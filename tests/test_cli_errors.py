"""Every entry point answers a user error with one line naming the cause, a non-zero exit and no
traceback (tracebacks are for bugs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_env import cli_env
from data_fixtures import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# (module, arguments, a phrase the one line must hold); {tmp} and {tok} are filled in per test.
CASES = {
    "train_no_tokenizer": ("train", ["--config", "configs/allava_stage1.py", "--workdir", "{tmp}/w"], "no tokenizer"),
    "train_unknown_preset": ("train", ["--config", "configs/allava_stage1.py", "--config.tokenizer={tok}",
                                       "--config.model=phi9", "--workdir", "{tmp}/w"], "unknown model preset 'phi9'"),
    "train_missing_config": ("train", ["--config", "{tmp}/nope.py", "--workdir", "{tmp}/w"], "nope.py"),
    "train_unknown_field": ("train", ["--config", "configs/demo.py", "--config.bach_size=8", "--workdir", "{tmp}/w"],
                            "bach_size"),
    "data_missing_file": ("data", ["check", "--data", "{tmp}/missing.json", "--tokenizer", "{tok}"],
                          "missing.json does not exist"),
    "data_bad_json": ("data", ["check", "--data", "{tmp}/bad.json", "--tokenizer", "{tok}"], "bad.json: not a JSON file"),
    "data_no_tokenizer": ("data", ["check", "--data", "{tmp}/bad.json", "--tokenizer", "{tmp}/tok_missing"],
                          "no such tokenizer directory"),
    "convert_missing_dir": ("convert", ["import", "--src", "{tmp}/nowhere", "--out", "{tmp}/ckpt"], "nowhere"),
    "generate_missing_checkpoint": ("generate", ["--checkpoint", "{tmp}/nockpt", "--prompt", "hi"], "nockpt"),
    "serve_missing_checkpoint": ("serve", ["--checkpoint", "{tmp}/nockpt", "--no-warmup"], "nockpt"),
    "eval_unknown_task": ("eval", ["--checkpoint", "{tmp}/nockpt", "--tasks", "mme", "--no-default-tasks"],
                          "unknown lmms-eval tasks ['mme']"),
    "compile_unknown_topology": ("train.compile", ["--config", "configs/allava_stage1.py", "--topology", "h100-7"],
                                 "--topology h100-7: not a known slice or GPU node (v4-8,"),
    "synth_missing_questions": ("synth", ["text", "--questions", "{tmp}/q.jsonl", "--out", "{tmp}/out", "--model", "m"],
                                "q.jsonl"),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line(case, tmp_path, tok):
    module, args, phrase = CASES[case]
    (tmp_path / "bad.json").write_text("{not json")
    args = [a.format(tmp=tmp_path, tok=tok) for a in args]
    env = cli_env(OPENAI_API_KEY="EMPTY", ALLAVA_HUGEPAGES="0")
    out = subprocess.run([sys.executable, "-m", f"allava_jax.{module}", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, out.stderr


def test_train_with_a_missing_bucket_is_one_line(gcs, tmp_path, tok):
    """Fast and named, before any model is built (against the emulator: nothing leaves 127.0.0.1)."""
    args = ["--config", "configs/allava_stage1.py", f"--config.tokenizer={tok}", "--workdir", "gs://no-such-bucket-x1/run"]
    env = cli_env(ALLAVA_HUGEPAGES="0", **gcs.env)
    out = subprocess.run([sys.executable, "-m", "allava_jax.train", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gs://no-such-bucket-x1/run") and "does not exist" in last, out.stderr
