"""``convert export``: our checkpoint (from ``import`` or training) -> a transformers Llava directory.

Writes ``config.json`` (``LlavaConfig``: Phi text config, CLIP vision config), sharded
``model*.safetensors`` in the legacy hub names (which transformers 4 and 5 both load), the
tokenizer with ``<image>``, a ``LlavaProcessor`` with the ALLaVA chat template and
``generation_config.json``. Each param leaf is restored (``checkpoints.ParamReader``) only when
its tensors are written and dropped after, so peak memory is the largest leaf plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from allava_jax import checkpoints, storage
from allava_jax.convert import configs as conf
from allava_jax.convert import hf
from allava_jax.convert.errors import ConvertError
from allava_jax.convert.importer import IMPORT_INFO
from allava_jax.convert.processor import build_processor, ov15_tokenizer, tokenizer_for, write_generation_config
from allava_jax.convert.writer import NUMPY_DTYPES, write_safetensors
from allava_jax.models import abstract_params
from allava_jax.models.config import LlavaConfig

EXPORT_LAYOUT = hf.HF_LLAVA_SAVED
# --format: what the directory is written as.
FORMATS = ("hf-llava", "llava-ov-1.5")
Log = Callable[[str], None]


@dataclasses.dataclass
class ExportResult:
    out: Path
    dtype: str
    files: list[Path]
    image_token_id: int
    notes: list[str]
    total_bytes: int | None = None  # the shards' size, when `files` are no longer local (remote --out)


class _OnDemand:
    """A param leaf restored from the checkpoint only when converted (``np.asarray``)."""

    def __init__(self, reader: checkpoints.ParamReader, path: tuple[str, ...], shape: tuple[int, ...]):
        self.reader, self.path, self.shape = reader, path, shape

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        value = np.asarray(self.reader.read(self.path), dtype=dtype)
        if value.shape != self.shape:
            raise ConvertError(f"checkpoint leaf {'/'.join(self.path)} has shape {value.shape}; the config says {self.shape}")
        return value


def _on_demand_tree(reader: checkpoints.ParamReader, config: LlavaConfig) -> dict:
    shapes = nn.unbox(abstract_params(config))
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    tree: dict = {}
    for keys, leaf in paths:
        path = tuple(k.key for k in keys)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _OnDemand(reader, path, tuple(leaf.shape))
    return tree


def _lm_head_bias(params: Any, config: LlavaConfig) -> np.ndarray | None:
    if not config.text.lm_head_bias:
        return None
    llm = params["llm"]
    return np.asarray(llm["lm_head_bias"] if config.text.tie_word_embeddings else llm["lm_head"]["bias"])


def _default_dtype(checkpoint: Path) -> str:
    """The dtype the weights were imported from (round trips stay bit-identical), else float32."""
    root, _ = checkpoints.resolve(checkpoint)
    try:
        dtype = json.loads((root / IMPORT_INFO).read_text()).get("source_dtype", "float32")
    except (FileNotFoundError, ValueError):
        return "float32"
    return dtype if dtype in NUMPY_DTYPES else "float32"


def hf_config(config: LlavaConfig, tokenizer: Any, dtype: str) -> Any:
    """``config.json`` contents, completed by transformers' own ``LlavaConfig``."""
    import transformers

    d = conf.llava_to_hf(config)
    if tokenizer is not None:
        d["text_config"].update(
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    hf_cfg = transformers.LlavaConfig(**{k: v for k, v in d.items() if k not in ("model_type",)})
    hf_cfg.dtype = dtype
    return hf_cfg


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    tokenizer: str | Path | None = None,
    drop_lm_head_bias: bool = False,
    max_shard_size: int = 5 * 10**9,
    progress: bool = True,
    log: Log = print,
    format: str = "hf-llava",
) -> ExportResult:
    """Write ``checkpoint`` as a transformers ``LlavaForConditionalGeneration`` directory at ``out``
    (``format="llava-ov-1.5"``: LLaVA-OneVision-1.5's released layout, ``export_ov15``).

    ``dtype``: float32 / bfloat16 / float16, or "auto" (the dtype ``import`` read, else float32).
    A non-zero ``lm_head`` bias (Phi-2's own head) has no place in HF Llava: refused unless
    ``drop_lm_head_bias``.
    """
    checkpoint = checkpoints.as_dir(checkpoint)
    if dtype == "auto":
        dtype = _default_dtype(checkpoint)
    if dtype not in NUMPY_DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose from auto, {', '.join(NUMPY_DTYPES)}")
    if format not in FORMATS:
        raise ConvertError(f"--format {format!r}: choose from {', '.join(FORMATS)}")
    config = checkpoints.load_config(checkpoint)
    if format == "llava-ov-1.5":
        return export_ov15(checkpoint, config, out, dtype, tokenizer, max_shard_size, progress)
    try:
        conf.llava_to_hf(config)
    except conf.UnsupportedConfig as e:
        raise ConvertError(f"{checkpoint}: cannot be expressed as HF Llava: {e}") from None
    notes: list[str] = []

    tok_dir = storage.local_dir(tokenizer) if tokenizer is not None else checkpoints.tokenizer_path(checkpoint)
    tok = None
    if tok_dir is None:
        notes.append("no tokenizer in the checkpoint and no --tokenizer: tokenizer and processor not written")
    else:
        config, tok = tokenizer_for(tok_dir, config, notes)

    with checkpoints.ParamReader(checkpoint) as reader:
        if not storage.is_remote(out):
            return _export(reader, config, tok, Path(out), dtype, drop_lm_head_bias, max_shard_size, progress, notes,
                           checkpoint)
        # transformers and safetensors write local files: export to a temporary directory (on the
        # same disk as the cache, $ALLAVA_CACHE), then upload it file by file.
        storage.cache_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="export_", dir=storage.cache_root()) as tmp:
            result = _export(reader, config, tok, Path(tmp), dtype, drop_lm_head_bias, max_shard_size, progress,
                             notes, checkpoint)
            size = result.total_bytes if result.total_bytes is not None else sum(f.stat().st_size for f in result.files)
            storage.upload_dir(tmp, out)
        return dataclasses.replace(result, out=storage.as_path(out), total_bytes=size,
                                   files=[storage.as_path(out) / f.name for f in result.files])


def _export(reader, config, tok, out, dtype, drop_lm_head_bias, max_shard_size, progress, notes, checkpoint) -> ExportResult:
    params = _on_demand_tree(reader, config)
    bias = _lm_head_bias(params, config)
    if bias is not None:
        peak = float(np.max(np.abs(bias))) if bias.size else 0.0
        if peak > 0 and not drop_lm_head_bias:
            raise ConvertError(
                f"{checkpoint}: llm/lm_head bias is non-zero (max |b| = {peak:.3g}) but transformers' "
                "LlavaForConditionalGeneration has no lm_head bias; pass --drop-lm-head-bias to drop it "
                "(logits then differ by that bias)"
            )
        notes.append("lm_head bias dropped" + (" (it was all zero)" if peak == 0 else f" (max |b| = {peak:.3g})"))
        config = config.replace(text={"lm_head_bias": False})

    out.mkdir(parents=True, exist_ok=True)
    hf_config(config, tok, dtype).save_pretrained(str(out))
    # Shapes only: stride-0 views, so planning the shards allocates nothing.
    shaped = _map_tree(params, lambda a: np.broadcast_to(np.zeros((), np.float32), a.shape))
    planned = [(name, tuple(t.shape)) for name, t in hf.export_tensors(shaped, config, EXPORT_LAYOUT)]
    # Each leaf is restored when export_tensors reaches it and dropped after its last tensor.
    with tqdm(total=len(planned), desc="export", unit="tensor", disable=not progress) as bar:
        files = write_safetensors(
            out, planned, hf.export_tensors(params, config, EXPORT_LAYOUT), dtype=dtype,
            max_shard_bytes=max_shard_size, progress=bar.update,
        )
    if tok is not None:
        processor = build_processor(config, tok)
        processor.save_pretrained(str(out))
        processor.image_processor.save_pretrained(str(out))  # preprocessor_config.json for transformers 4
        write_generation_config(out, tok, config.chat_template)
    return ExportResult(out, dtype, files, config.image_token_id, notes)


def export_ov15(checkpoint: Path, config: LlavaConfig, out: Path, dtype: str, tokenizer: str | Path | None,
                max_shard_size: int, progress: bool) -> ExportResult:
    """The release's layout: ``config.json`` (``llavaonevision1_5`` / ``rice_vit``), sharded
    ``model*.safetensors`` with ``visual.*`` / ``model.*`` / ``lm_head.*`` (q/k/v fused back into
    ``attn.qkv``), the tokenizer and ``preprocessor_config.json``, for the authors' code, NeMo
    Automodel or a vLLM build with the model (none of which this package runs)."""
    try:
        d = conf.ov15_to_hf(config)
    except conf.UnsupportedConfig as e:
        raise ConvertError(f"{checkpoint}: {e}") from None
    notes: list[str] = []
    tok_dir = Path(tokenizer) if tokenizer is not None else checkpoints.tokenizer_path(checkpoint)
    tok = ov15_tokenizer(tok_dir, config, notes) if tok_dir is not None else None
    if tok is None:
        notes.append("no tokenizer in the checkpoint and no --tokenizer: tokenizer not written")
    else:
        d["text_config"].update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    d["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(conf.ov15_preprocessor(config), indent=2) + "\n")
    with checkpoints.ParamReader(checkpoint) as reader:
        params = _on_demand_tree(reader, config)
        shaped = _map_tree(params, lambda a: np.broadcast_to(np.zeros((), np.float32), a.shape))
        planned = [(name, tuple(t.shape)) for name, t in hf.export_tensors(shaped, config, hf.OV15_RELEASE)]
        with tqdm(total=len(planned), desc="export", unit="tensor", disable=not progress) as bar:
            files = write_safetensors(out, planned, hf.export_tensors(params, config, hf.OV15_RELEASE), dtype=dtype,
                                      max_shard_bytes=max_shard_size, progress=bar.update)
    if tok is not None:
        tok.save_pretrained(str(out))
        write_generation_config(out, tok, config.chat_template)
    return ExportResult(out, dtype, files, config.image_token_id, notes)


def _map_tree(tree: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(tree, dict):
        return {k: _map_tree(v, fn) for k, v in tree.items()}
    return fn(tree)


def summary(result: ExportResult) -> str:
    size = result.total_bytes if result.total_bytes is not None else sum(f.stat().st_size for f in result.files)
    lines = [
        f"exported -> {result.out} ({result.dtype}, {len(result.files)} shard(s), {size / 1e9:.2f} GB); "
        f"image_token_index {result.image_token_id}",
        *(f"  note: {n}" for n in result.notes),
    ]
    return "\n".join(lines)
