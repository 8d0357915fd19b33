"""One readable training loop: config in, checkpoints and metrics out, resumable at any point."""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from allava_jax import checkpoints, compile_cache, storage
from allava_jax.data import pipeline
from allava_jax.errors import UserError
from allava_jax.models import Llava
from allava_jax.models.config import LlavaConfig, get_preset
from allava_jax.train import checkpoint as ckpt
from allava_jax.train import data as train_data
from allava_jax.train import flops as flops_lib
from allava_jax.train import optim
from allava_jax.train.metrics import MetricWriter, device_memory_gib
from allava_jax.train.profiling import ProfileWindow
from allava_jax.train.sharding import batch_sharding, batch_shards, make_mesh, replicated, rules_from_config
from allava_jax.train.state import TrainState, boxed_abstract_params, create_state, state_shardings, strip_boxes
from allava_jax.train.step import make_eval_step, make_train_step
from allava_jax.train.watchdog import HangWatchdog

log = logging.getLogger("allava_jax.train")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and the last good checkpoint stays."""


class _Preemption:
    """A lone process: SIGTERM sets a flag; the loop saves at the end of the current step and exits.

    With several processes this installs nothing: ``jax.distributed.initialize`` installed JAX's
    preemption notifier (a C++ SIGTERM handler), which tells every process, and the loop asks
    ``reached_preemption`` for the step they all stop at. A Python handler would replace that
    notifier: only the signalled process would know, and the others would die in their next
    collective.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle) if jax.process_count() == 1 else None

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _all_agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (a decision every host must take at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def tokenizer_dir(cfg: ConfigDict) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.init_from:
        path = checkpoints.tokenizer_path(cfg.init_from)
        if path is not None:
            return str(path)
    raise UserError("no tokenizer: set config.tokenizer (a local directory) or init_from a checkpoint that has one")


def model_config(cfg: ConfigDict, tokenizer: Any) -> LlavaConfig:
    """The checkpoint's config when initialising from one, else the preset; then overrides.

    A fresh model takes its image placeholder id from the tokenizer's ``<image>`` token.
    """
    overrides = cfg.model_overrides.to_dict()
    if cfg.init_from:
        base = checkpoints.load_config(cfg.init_from)
    else:
        base = get_preset(cfg.model)
        if "image_token_id" not in overrides:
            image_id = tokenizer.convert_tokens_to_ids("<image>")
            if image_id is None or image_id == tokenizer.unk_token_id:
                raise UserError("the tokenizer has no <image> token: add it, or set model_overrides.image_token_id")
            overrides["image_token_id"] = image_id
    config = base.replace(**overrides)
    if len(tokenizer) > config.text.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.text.vocab_size}")
    return config


@dataclasses.dataclass
class StepSetup:
    """Everything the train step needs, built from a config on a mesh (shapes only, nothing
    allocated): ``train``, the benchmarks and compile-only analysis share it."""

    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    trainable_paths: list[str]
    param_rules: list[tuple[str, float | None]]
    abstract: TrainState
    shardings: TrainState
    step: Callable  # (state, batch) -> (state, metrics), not yet jitted

    def jit(self, mesh: Mesh) -> Callable:
        return jax.jit(
            self.step,
            in_shardings=(self.shardings, batch_sharding(mesh)),
            out_shardings=(self.shardings, replicated(mesh)),
            donate_argnums=0,
        )


def setup_step(cfg: ConfigDict, mconf: LlavaConfig, mesh: Mesh, axis_rules: Any, accum_steps: int = 1) -> StepSetup:
    """Optimizer, schedule, abstract sharded state and the step function. Call inside
    ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(axis_rules)``."""
    param_rules = [(pattern, mult) for pattern, mult in cfg.param_rules]
    schedule = optim.schedule(cfg.optim.lr, cfg.optim.end_lr, cfg.total_steps, cfg.optim.warmup_fraction)
    trainable_paths = [
        p for p in optim.flatten(strip_boxes(boxed_abstract_params(mconf))) if optim.multiplier(p, param_rules) is not None
    ]
    optimizer = optim.make_optimizer(cfg.optim, cfg.total_steps, trainable_paths, param_rules)
    abstract, shardings = state_shardings(mconf, optimizer, param_rules, mesh, axis_rules)
    step = make_train_step(Llava(mconf), optimizer, schedule, accum_steps, cfg.logits_fraction, batch_shards(mesh),
                           cfg.logits_chunk)
    return StepSetup(optimizer, schedule, trainable_paths, param_rules, abstract, shardings, step)


def _finite(x: Any) -> bool:
    return bool(np.isfinite(x))


def train(cfg: ConfigDict, workdir: Any, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Train to ``cfg.total_steps`` (resuming from ``workdir`` if it has a checkpoint).

    ``workdir`` may be local or on object storage (``gs://``). ``clock`` times the logged windows
    and the time-based checkpoints (injectable for tests).
    """
    workdir = storage.as_path(workdir)
    storage.check_access(workdir, write=True)
    workdir.mkdir(parents=True, exist_ok=True)
    compile_cache.enable(cfg.compile_cache_dir)
    tokenizer = pipeline.load_tokenizer(tokenizer_dir(cfg))
    mconf = model_config(cfg, tokenizer)
    devices = jax.devices()[: cfg.num_devices] if cfg.num_devices else jax.devices()
    mesh = make_mesh(dict(cfg.mesh), devices, dict(cfg.mesh_dcn))
    axis_rules = rules_from_config(cfg.axis_rules)
    total = cfg.total_steps
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size % micro:
        raise UserError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size={micro}")

    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
        setup = setup_step(cfg, mconf, mesh, axis_rules, cfg.batch_size // micro)
        optimizer, param_rules, trainable_paths = setup.optimizer, setup.param_rules, setup.trainable_paths
        abstract, shardings = setup.abstract, setup.shardings

        num_shards = cfg.data.num_shards or jax.process_count()
        kwargs = train_data.pipeline_kwargs(cfg.data, mconf, tokenizer, cfg.seed)
        stream = train_data.make_stream(batch_size=cfg.batch_size, num_shards=num_shards, **kwargs)
        manager = ckpt.manager(workdir, cfg.keep_checkpoints, cfg.checkpoint_every, total)
        start = manager.latest_step()
        if start is not None:
            log.info("resuming from %s step %d", manager.directory, start)
            state = ckpt.restore(manager, start, abstract, stream)
        else:
            start = 0
            state = create_state(mconf, optimizer, param_rules, shardings, abstract, seed=cfg.seed, init_from=cfg.init_from or None)
            if jax.process_index() == 0:
                checkpoints.copy_tokenizer(tokenizer_dir(cfg), manager.directory)

        step_fn = setup.jit(mesh)
        eval_fn = jax.jit(make_eval_step(Llava(mconf), cfg.logits_fraction, batch_shards(mesh), cfg.logits_chunk), in_shardings=(None, batch_sharding(mesh)), out_shardings=replicated(mesh))
        vision_trained = any(p.startswith("vision/") for p in trainable_paths)
        peak = flops_lib.peak_flops_per_device(cfg.peak_flops_per_device) * mesh.size

        writer = MetricWriter(workdir, total, start, wandb=cfg.wandb, config=cfg.to_dict())
        profile = ProfileWindow(cfg.profile.start_step, cfg.profile.num_steps, workdir / "profile", cfg.profile.all_hosts)
        watchdog = HangWatchdog(cfg.hang_timeout_s)
        preemption = _Preemption()
        summary: dict[str, Any] = {"start_step": start}
        window = _Window(clock())
        last_save = clock()
        first_log, m = True, None
        try:
            for step in range(start, total):
                done = step + 1
                with profile.step(done):
                    t_wait = clock()
                    host_batch = next(stream)
                    n_images = int(host_batch["image_mask"].sum()) * jax.process_count()
                    # native resolution: each image's patch count (this host's, taken as every host's)
                    patches = (np.tile(flops_lib.image_patch_counts(host_batch["patch_segments"]), jax.process_count())
                               if "patch_segments" in host_batch else None)
                    batch = pipeline.to_global_batch(host_batch, mesh)
                    window.input_wait += clock() - t_wait
                    state, metrics = step_fn(state, batch)
                    m = jax.device_get(metrics)
                profile.after_step(done)
                watchdog.beat(done)
                watchdog.start()  # armed once the first step (compilation) is done; no-op after
                if not all(_finite(m[k]) for k in ("loss", "grad_norm", "update_norm")):
                    raise TrainingDiverged(
                        f"step {done}: loss={m['loss']} grad_norm={m['grad_norm']} update_norm={m['update_norm']} "
                        "is not finite; stopping. "
                        f"The last good checkpoint ({manager.latest_step()}) is kept. Lower the learning rate or "
                        "check the data around this step."
                    )
                window.steps += 1
                window.tokens += int(m["real_tokens"])
                row_len = host_batch["tokens"].shape[1]  # data.seq_len, or an offline plan's row_len
                window.flops += flops_lib.train_step_flops(
                    mconf, int(m["real_tokens"]), n_images, row_len, vision_trained, int(m["target_tokens"]), patches
                )
                logged = done % cfg.log_every == 0 or done == total
                if logged:
                    now = clock()
                    elapsed = max(now - window.start, 1e-9)
                    stats = stream.stats()
                    row = {
                        "loss": float(m["loss"]),
                        "accuracy": float(m["accuracy"]),
                        "lr": float(m["lr"]),
                        "grad_norm": float(m["grad_norm"]),
                        "tokens_per_s": window.tokens / elapsed,
                        "mfu": window.flops / elapsed / peak,
                        "step_time_s": elapsed / window.steps,
                        # the share of the window's wall time spent waiting for the input pipeline
                        "input_wait_fraction": min(window.input_wait / elapsed, 1.0),
                        "skipped_samples": stats["skipped_total"] * jax.process_count(),
                        **device_memory_gib(),
                    }
                    if first_log:  # this window's time includes jit compilation
                        row["includes_compile"] = True
                        first_log = False
                    writer.write(done, row)
                    writer.show({k: row[k] for k in ("loss", "accuracy", "lr", "tokens_per_s", "step_time_s", "input_wait_fraction")})
                    window = _Window(now)
                writer.bar.update(1)
                if cfg.eval.every and (done % cfg.eval.every == 0 or done == total) and cfg.eval.sources:
                    ev = evaluate(cfg, mconf, tokenizer, mesh, eval_fn, state.params)
                    writer.write(done, ev)
                    summary.update(ev)
                stop = preemption.requested or manager.reached_preemption(done)
                timed = bool(cfg.checkpoint_every_minutes) and logged and _all_agree(
                    clock() - last_save >= 60.0 * cfg.checkpoint_every_minutes
                )
                if stop or timed or done % cfg.checkpoint_every == 0 or done == total:
                    writer.flush()  # the rows up to this step are durable before the checkpoint is
                    ckpt.save(manager, done, state, stream, mconf, cfg.to_dict())
                    last_save = clock()
                if stop:
                    manager.wait_until_finished()
                    log.warning("preempted: checkpoint at step %d saved; rerun the same command to resume", done)
                    summary["preempted_at"] = done
                    break
            manager.wait_until_finished()
        finally:
            watchdog.stop()
            profile.close()
            preemption.restore()
            writer.close()
            manager.close()
            stream.close()
        summary.update({"step": int(jax.device_get(state.step)), "loss": None if m is None else float(m["loss"])})
        summary["data"] = stream.stats()
        return summary


@dataclasses.dataclass
class _Window:
    """What one logged window of steps accumulated since ``start`` (a clock reading)."""

    start: float
    steps: int = 0
    tokens: int = 0
    flops: float = 0.0
    input_wait: float = 0.0


def evaluate(cfg: ConfigDict, mconf: LlavaConfig, tokenizer: Any, mesh: Any, eval_fn: Any, params: dict) -> dict[str, float]:
    """Held-out loss and token accuracy over ``cfg.eval.batches`` batches of ``cfg.eval.sources``
    (packed online even when training reads an offline plan: the plan is for the training sources)."""
    data_cfg = cfg.data.copy_and_resolve_references()
    with data_cfg.unlocked():
        data_cfg.sources = list(cfg.eval.sources)
        if data_cfg.packing == "offline":
            data_cfg.packing, data_cfg.plan = "best_fit", ""
    kwargs = train_data.pipeline_kwargs(data_cfg, mconf, tokenizer, cfg.seed)
    kwargs.update(num_epochs=1, drop_remainder=False, max_bad_fraction=1.0, worker_count=0)
    num_shards = jax.process_count()
    stream = train_data.make_stream(batch_size=cfg.eval.batch_size, num_shards=num_shards, **kwargs)
    loss_sum = correct = targets = 0.0
    try:
        for _ in range(cfg.eval.batches):
            try:
                host_batch = next(stream)
            except StopIteration:
                break
            rows = host_batch["tokens"].shape[0]
            if rows * jax.process_count() % mesh.size:  # a short final batch: pad with empty rows
                pad = mesh.size - rows % mesh.size
                host_batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in host_batch.items()}
            out = jax.device_get(eval_fn(params, pipeline.to_global_batch(host_batch, mesh)))
            loss_sum += float(out["loss_sum"])
            correct += float(out["correct"])
            targets += float(out["targets"])
    finally:
        stream.close()
    targets = max(targets, 1.0)
    return {"eval_loss": loss_sum / targets, "eval_accuracy": correct / targets, "eval_perplexity": math.exp(min(loss_sum / targets, 50.0))}
