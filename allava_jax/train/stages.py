"""Staged runs: a config's ``stages`` run in order, stage k+1 starting from stage k's checkpoint.

Apart from the CLI (``__main__`` defines absl flags on import) so tests and other entry points can
run stages in-process.
"""

from __future__ import annotations

import logging
from typing import Any

from ml_collections import ConfigDict

from allava_jax.errors import UserError


def run_stage(cfg: ConfigDict, workdir: Any) -> dict:
    """One stage (or a run without ``stages``): what ``cfg.stage_kind`` names, into ``workdir``."""
    if cfg.stage_kind == "train":
        from allava_jax.train import loop

        return loop.train(cfg, workdir)
    if cfg.stage_kind == "vision_pretrain":
        from allava_jax.train import vision_pretrain

        return vision_pretrain.run(cfg, workdir)
    raise UserError(f"stage_kind {cfg.stage_kind!r}; choose 'train' or 'vision_pretrain'")


def run_stages(cfg: ConfigDict, workdir: Any) -> list[dict]:
    """Each stage's overrides on top of the shared config; stage k+1 starts from stage k. A
    preempted stage ends the run (rerunning the command resumes that stage, then goes on)."""
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
        summaries.append({"stage": name, **run_stage(stage, previous)})
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
