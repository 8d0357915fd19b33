"""``python -m allava_jax.train --config configs/allava_stage1.py --workdir runs/s1``.

Running the same command again resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from allava_jax import storage
from allava_jax.errors import report_user_errors
from allava_jax.train.cli import load_config, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go (local or gs://).", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (manual multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Process count (manual multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (manual multi-host).")


def run_stages(cfg: ConfigDict, workdir: Any) -> list[dict]:
    """Each stage's overrides on top of the shared config; stage k+1 starts from stage k. A
    preempted stage ends the run (rerunning the command resumes that stage, then goes on)."""
    from allava_jax.train.loop import train

    summaries, previous = [], None
    for i, overrides in enumerate(cfg.stages):
        stage = cfg.copy_and_resolve_references()
        with stage.unlocked():
            stage.stages = ()
            stage.update_from_flattened_dict(_flatten(dict(overrides)))
            if previous is not None:
                stage.init_from = str(previous / "checkpoints")
        name = overrides.get("name", f"stage{i + 1}")
        previous = workdir / name
        logging.info("stage %s -> %s", name, previous)
        summaries.append({"stage": name, **train(stage, previous)})
        if "preempted_at" in summaries[-1]:  # unfinished: the next stage must not start from it
            break
    return summaries


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k == "name":
            continue
        if isinstance(v, (dict, ConfigDict)) and not k.endswith("overrides"):
            out.update(_flatten(dict(v), f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@report_user_errors
def main(argv: list[str]) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain log every save through absl at INFO
    from allava_jax.train import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    from allava_jax.train.loop import train

    cfg, workdir = load_config(_CONFIG), storage.as_path(_WORKDIR.value)
    if cfg.demo_dir:
        from allava_jax.data import demo

        if jax.process_index() == 0:
            demo.make_demo_dataset(cfg.demo_dir, native=cfg.get("demo_native", False))
    summary = run_stages(cfg, workdir) if cfg.stages else train(cfg, workdir)
    if cfg.demo_dir and jax.process_index() == 0:
        from allava_jax.train import demo_report

        demo_report.report(cfg, workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    from allava_jax import hugepages

    hugepages.reexec_with_hugepages()
    app.run(main, flags_parser=parse_flags)
