"""Model checkpoints on disk: one format for ``convert import``, training, ``generate`` and ``serve``.

A checkpoint is an orbax ``CheckpointManager`` directory. Each step holds the item ``params``
(our param tree, fp32) and ``model_config`` (``LlavaConfig`` as JSON, or a ``ClipConfig`` with
``"kind": "clip"`` for a CLIP scorer); training adds
``opt_state`` and ``data_iter`` beside them. The tokenizer lives in ``<root>/tokenizer``.

``--checkpoint DIR`` may name the manager root (latest step is used), one step directory, or a
training workdir (its ``checkpoints/`` is used). Any of them may be on object storage (``gs://``):
orbax reads and writes buckets itself, paths are ``epath.Path`` (``storage.as_path``), and the
tokenizer directory is copied up (``storage.upload_dir``) or down (``storage.local_dir``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from allava_jax import storage
from allava_jax.errors import UserError
from allava_jax.models.config import ClipConfig, LlavaConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"
TOKENIZER = "tokenizer"


class CheckpointNotFound(FileNotFoundError):
    """The path holds no checkpoint we can read."""


def save_model(
    directory: str | Path,
    params: Any,
    config: LlavaConfig | ClipConfig,
    *,
    step: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> Any:
    """Write ``params`` + config as step ``step`` of a checkpoint at ``directory`` (atomic)."""
    directory = as_dir(directory)
    with ocp.CheckpointManager(directory, item_names=(PARAMS, MODEL_CONFIG)) as manager:
        manager.save(
            step,
            args=ocp.args.Composite(
                **{PARAMS: ocp.args.StandardSave(params), MODEL_CONFIG: ocp.args.JsonSave(config.to_dict())}
            ),
            force=True,
        )
        manager.wait_until_finished()
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, directory)
    return directory


def as_dir(path: str | os.PathLike) -> Any:
    """An absolute local ``Path``, or the ``epath.Path`` of a remote one."""
    return storage.as_path(path) if storage.is_remote(path) else Path(path).absolute()


def copy_tokenizer(src: str | Path, checkpoint_root: str | Path) -> Any:
    """Copy a local tokenizer directory to ``<checkpoint_root>/tokenizer`` (replacing any old one
    locally; uploaded file by file to a bucket)."""
    dst = as_dir(checkpoint_root) / TOKENIZER
    if storage.is_remote(dst):
        storage.upload_dir(storage.local_dir(src), dst)
        return dst
    if Path(src).absolute() != dst.absolute():
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(storage.local_dir(src), dst)
    return dst


def resolve(path: str | Path) -> tuple[Any, int]:
    """(manager root, step) for a checkpoint root, a step directory or a training workdir (a
    ``Path``, or an ``epath.Path`` for a remote one)."""
    path = as_dir(path)
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such checkpoint directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / PARAMS).is_dir():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / PARAMS).is_dir())
    if not steps:
        raise CheckpointNotFound(f"{path}: no checkpoint steps with '{PARAMS}' found")
    return path, steps[-1]


def load_config(path: str | Path) -> LlavaConfig:
    return LlavaConfig.from_dict(_model_config_dict(path))


def load_clip_config(path: str | Path) -> ClipConfig:
    """The ``ClipConfig`` of a CLIP scorer checkpoint (``convert import --clip``)."""
    d = _model_config_dict(path)
    if d.get("kind") != "clip":
        raise UserError(f"{path} is a VLM checkpoint, not a CLIP scorer: import one with "
                        "`python -m allava_jax.convert import --clip CLIP_DIR --out CKPT`")
    return ClipConfig.from_dict(d)


def _model_config_dict(path: str | Path) -> dict:
    root, step = resolve(path)
    with ocp.CheckpointManager(root, item_names=(MODEL_CONFIG,)) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))
    return dict(restored[MODEL_CONFIG])


def load_params(path: str | Path, target: Any | None = None, *, host: bool = False) -> Any:
    """Restore params. ``target``: a tree of ``jax.ShapeDtypeStruct`` with shardings, so each
    device reads only its own shards; None restores them as saved (arrays saved from a device onto
    the default device). ``host``: numpy arrays, whatever was saved, so a caller that reshapes or
    casts them before its one device copy never holds two copies on a device (an accelerator's
    memory may fit one model, not two)."""
    root, step = resolve(path)
    if host:
        handler = {PARAMS: ocp.PyTreeCheckpointHandler()}
        with ocp.CheckpointManager(root, item_names=(PARAMS,), item_handlers=handler) as manager:
            shapes = manager.item_metadata(step)[PARAMS]
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
            args = ocp.args.Composite(**{PARAMS: ocp.args.PyTreeRestore(restore_args=as_numpy)})
            restored = manager.restore(step, args=args)
        return restored[PARAMS]
    with ocp.CheckpointManager(root, item_names=(PARAMS,)) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    return restored[PARAMS]


def load_model(path: str | Path, target: Any | None = None, *, host: bool = False) -> tuple[LlavaConfig, Any]:
    return load_config(path), load_params(path, target, host=host)


def tokenizer_path(path: str | Path) -> Path | None:
    """The checkpoint's tokenizer directory, if it has one (a local copy for a remote checkpoint:
    tokenizers read local files)."""
    root, _ = resolve(path)
    for candidate in (root / TOKENIZER, root.parent / TOKENIZER):
        if candidate.is_dir():
            return storage.local_dir(candidate)
    return None


class ParamReader:
    """Restores single param leaves on demand, as numpy: for streaming a model out (``convert
    export``) without holding the whole tree."""

    def __init__(self, path: str | Path):
        root, self.step = resolve(path)
        self._manager = ocp.CheckpointManager(root, item_names=(PARAMS,))

    def read(self, leaf_path: tuple[str, ...]) -> Any:
        def nest(value: Any) -> Any:
            for key in reversed(leaf_path):
                value = {key: value}
            return value

        args = ocp.args.PyTreeRestore(
            item=nest(np.zeros((0,), np.float32)),
            restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)),
            partial_restore=True,
        )
        tree = self._manager.restore(self.step, args=ocp.args.Composite(**{PARAMS: args}))[PARAMS]
        for key in leaf_path:
            tree = tree[key]
        return tree

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "ParamReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
