"""``python -m allava_jax.train --config configs/allava_stage1.py --workdir runs/s1``.

Running the same command again resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from allava_jax import storage
from allava_jax.errors import report_user_errors
from allava_jax.train.cli import load_config, parse_flags
from allava_jax.train.stages import run_stage, run_stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go (local or gs://).", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (manual multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Process count (manual multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (manual multi-host).")


@report_user_errors
def main(argv: list[str]) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/grain log every save through absl at INFO
    from allava_jax.train import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    cfg, workdir = load_config(_CONFIG), storage.as_path(_WORKDIR.value)
    if cfg.demo_dir:
        from allava_jax.data import demo

        if jax.process_index() == 0:
            demo.make_demo_dataset(cfg.demo_dir, native=cfg.get("demo_native", False))
    summary = run_stages(cfg, workdir) if cfg.stages else run_stage(cfg, workdir)
    preempted = any("preempted_at" in s for s in (summary if isinstance(summary, list) else [summary]))
    if cfg.demo_dir and jax.process_index() == 0 and not preempted:  # the report needs the finished run
        from allava_jax.train import demo_report

        demo_report.report(cfg, workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    from allava_jax import hugepages

    hugepages.reexec_with_hugepages()
    app.run(main, flags_parser=parse_flags)
