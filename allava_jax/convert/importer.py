"""``convert import``: Hugging Face / original ALLaVA weights -> our checkpoint (``checkpoints.save_model``).

Three sources, all local directories:

* a ``LlavaForConditionalGeneration`` directory (Phi text config), any tensor spelling;
* an original LLaVA/ALLaVA directory (``model.mm_projector.*``, ``mm_*`` config keys), with or
  without ``lm_head.bias`` and with or without the vision tower (then ``--vision CLIP_DIR``);
* a CLIP directory plus a Phi directory: the projector, and only it, is freshly initialised.

Nothing holds the whole model: every leaf is checked from shapes first, then read, converted to
fp32 and written by orbax one at a time (``streaming.LazyLeaf``); peak memory is the largest leaf. Nothing is left at random init silently:
a missing tensor is an error, and the fresh projector of a CLIP + Phi import is printed.

``image_token_id`` is the tokenizer's ``<image>`` id; the token is added (and the tokenizer saved
that way into the checkpoint) when missing, and must fall inside ``vocab_size``.
"""

from __future__ import annotations

import dataclasses
import functools
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
from allava_jax.convert.processor import IMAGE_PAD, ov15_tokenizer, tokenizer_for
from allava_jax.convert.sources import TensorSource, has_tokenizer, read_json
from allava_jax.convert.streaming import LazyLeaf, streaming_numpy_saves
from allava_jax.data.images import CLIP_MEAN, CLIP_STD
from allava_jax.models import abstract_params
from allava_jax.models.clip import abstract_clip_params
from allava_jax.models.config import ClipConfig, LlavaConfig
from allava_jax.models.projector import Merger, Projector

IMPORT_INFO = "import_info.json"  # provenance next to the checkpoint (export uses its dtype)
Log = Callable[[str], None]


@dataclasses.dataclass
class ImportResult:
    """What was imported from where, for the CLI's summary and for tests."""

    checkpoint: Path
    config: LlavaConfig | ClipConfig
    source: str  # "hf_llava" | "original" | "clip+<family>" | "clip" (a scorer)
    source_dtype: str
    fresh: list[str]  # param paths freshly initialised (only ever the projector)
    ignored: list[str]  # source tensors not used
    notes: list[str]


Plan = list[tuple[hf.Spec, tuple[int, ...], TensorSource]]


def _shapes(config: LlavaConfig) -> Any:
    return nn.unbox(abstract_params(config))


def _plan(source: TensorSource, config: LlavaConfig, layout: hf.Layout, shapes: Any,
          part: Callable[[tuple[str, ...]], bool]) -> Plan:
    """Every leaf of ``part`` with its source, checked (names, shapes) before anything is written."""
    try:
        plan = hf.plan_params(source.shape, config, layout, shapes, skip=lambda p: not part(p))
    except (KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConvertError(f"{source.directory}: {msg}") from None
    return [(spec, shape, source) for spec, shape in plan]


def _lazy_tree(plan: Plan, bar: tqdm) -> dict:
    """Our tree with ``LazyLeaf`` leaves: each is read from its source only when orbax writes it."""
    params: dict = {}
    for spec, shape, source in plan:
        make = functools.partial(hf.read_leaf, source.read, spec, shape, progress=bar.update)
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = LazyLeaf.create(shape, np.float32, make)
    return params


def _ignored(plan: Plan, *sources: TensorSource) -> list[str]:
    used = {n for spec, _, _ in plan for n in ([spec.name] if spec.layers is None else [spec.name.format(i=i) for i in spec.layers])}
    return sorted(set().union(*(s.names for s in sources)) - used)


def _merge(*trees: dict) -> dict:
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = _merge(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def _fresh_projector(config: LlavaConfig, seed: int) -> dict:
    if config.projector_type == "merger":
        merge = config.vision.spatial_merge_size**2
        module = Merger(config.text.hidden_size, merge, config.vision.layer_norm_eps)
        x = np.zeros((1, merge, config.vision.hidden_size), np.float32)
    else:
        module = Projector(config.text.hidden_size, depth=config.projector_depth)
        x = np.zeros((1, 1, config.vision.hidden_size), np.float32)
    params = nn.unbox(module.init(jax.random.key(seed), x)["params"])
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def _tokenizer(
    candidates: list[Path | None], config: LlavaConfig, notes: list[str], log: Log, chat_template: str = ""
) -> tuple[LlavaConfig, Any]:
    """The first candidate directory with a tokenizer; ``<image>`` added if missing. The chat
    template (``chat_template``, else the family's) must find its tokens there."""
    if chat_template:
        config = config.replace(chat_template=chat_template)
    notes.append(f"chat template: {config.chat_template}")
    directory = next((Path(c) for c in candidates if c is not None and has_tokenizer(c)), None)
    if directory is None:
        notes.append(
            f"no tokenizer found: the checkpoint has none (export will need --tokenizer); "
            f"image_token_id stays {config.image_token_id}"
        )
        if not 0 <= config.image_token_id < config.text.vocab_size:
            raise ConvertError(
                f"image_token_id {config.image_token_id} is outside vocab_size {config.text.vocab_size}; pass --tokenizer"
            )
        return config, None
    return tokenizer_for(directory, config, notes)


def _save(out: Path, plan: Plan, extra: dict, result: ImportResult, tokenizer: Any, progress: bool) -> None:
    """Stream every planned leaf (read, convert to fp32, write) through ``checkpoints.save_model``."""
    total = sum(hf.num_tensors(spec) for spec, _, _ in plan)
    with tqdm(total=total, desc="import", unit="tensor", disable=not progress) as bar, streaming_numpy_saves():
        params = _merge(_lazy_tree(plan, bar), extra)
        root = checkpoints.save_model(out, params, result.config)
    if tokenizer is not None:
        if storage.is_remote(root):  # transformers writes local files: save, then upload
            with tempfile.TemporaryDirectory(prefix="allava_tok_") as tmp:
                tokenizer.save_pretrained(tmp)
                storage.upload_dir(tmp, root / checkpoints.TOKENIZER)
        else:
            tokenizer.save_pretrained(str(root / checkpoints.TOKENIZER))
    info = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("checkpoint", "config", "ignored")}
    info["ignored_count"] = len(result.ignored)
    (root / IMPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    result.checkpoint = root


def _source_dtype(*sources: TensorSource) -> str:
    dtypes = set().union(*(s.dtypes for s in sources))
    return dtypes.pop() if len(dtypes) == 1 else "mixed:" + ",".join(sorted(dtypes))


def import_llava(
    src: str | Path,
    out: str | Path,
    *,
    vision: str | Path | None = None,
    tokenizer: str | Path | None = None,
    chat_template: str = "",
    progress: bool = True,
    log: Log = print,
) -> ImportResult:
    """An HF Llava or original LLaVA/ALLaVA directory (detected from its tensor names) -> checkpoint.

    ``vision``: a CLIP directory for the tower's config (original layout; and its weights when
    the checkpoint has none). Without it the tower's config is inferred from tensor shapes.
    ``chat_template``: overrides the decoder family's (``FAMILY_CHAT_TEMPLATE``).
    """
    src = Path(src)
    d = read_json(src / "config.json")
    if conf.is_ov15(d):
        return import_ov15(src, out, tokenizer=tokenizer, progress=progress, log=log)
    source = TensorSource(src)
    try:
        kind, layout = hf.detect_layout(source.names)
    except hf.UnknownLayout as e:
        raise ConvertError(f"{src}: {e}") from None
    notes: list[str] = []
    has_bias = layout.head + "bias" in source.names
    clip_source = TensorSource(vision) if vision is not None else None
    vision_source = None
    try:
        if kind == "hf_llava":
            if d.get("model_type") != "llava" and not conf.is_original_llava(d):
                notes.append(f"config model_type {d.get('model_type')!r} (expected 'llava')")
            config = conf.llava_from_hf(d, lm_head_bias=has_bias)
        else:
            if layout.vision == "" and clip_source is None:
                raise ConvertError(
                    f"{src}: the checkpoint has no vision tower tensors (it references "
                    f"{d.get('mm_vision_tower')!r}); pass --vision CLIP_DIR"
                )
            if vision is not None:
                vcfg = conf.vision_from_hf(read_json(Path(vision) / "config.json"))
                notes.append(f"vision tower config from {vision}")
            else:
                n = 0
                while f"{layout.vision}encoder.layers.{n}.mlp.fc1.weight" in source.names:
                    n += 1
                vcfg = conf.vision_from_tensors(source.shape, layout.vision, n)
                notes.append(
                    f"vision tower config inferred from tensor shapes ({vcfg.num_layers} layers, hidden "
                    f"{vcfg.hidden_size}, {vcfg.image_size} px); assumed head_dim 64 ({vcfg.num_heads} heads), "
                    "quick_gelu, eps 1e-5 — pass --vision CLIP_DIR to use its config.json instead"
                )
            config = conf.original_from_hf(d, vcfg, lm_head_bias=has_bias)
            if layout.vision == "":
                vision_source = clip_source
                layout = dataclasses.replace(layout, vision=hf.clip_layout(clip_source.names).vision)
                notes.append(f"vision tower weights from {vision}")
    except conf.UnsupportedConfig as e:
        raise ConvertError(f"{src / 'config.json'}: {e}") from None
    notes.append(f"lm_head bias: {'present' if has_bias else 'absent'}")
    config, tok = _tokenizer([tokenizer, src], config, notes, log, chat_template)

    shapes = _shapes(config)
    is_vision = lambda p: p[0] == "vision"  # noqa: E731
    if vision_source is None:
        plan = _plan(source, config, layout, shapes, lambda p: True)
        sources = [source]
    else:
        plan = _plan(vision_source, config, layout, shapes, is_vision)
        plan += _plan(source, config, layout, shapes, lambda p: not is_vision(p))
        sources = [source, vision_source]
    result = ImportResult(checkpoints.as_dir(out), config, kind, _source_dtype(*sources), [], _ignored(plan, source), notes)
    log(f"writing {out} ...")
    _save(checkpoints.as_dir(out), plan, {}, result, tok, progress)
    return result


def import_ov15(src: str | Path, out: str | Path, *, tokenizer: str | Path | None = None, progress: bool = True,
                log: Log = print) -> ImportResult:
    """A LLaVA-OneVision-1.5 release directory (``config.json`` model_type ``llavaonevision1_5``,
    ``visual.*`` / ``model.*`` / ``lm_head.*`` in sharded safetensors, the Qwen2 tokenizer,
    ``preprocessor_config.json``) -> checkpoint. No remote code runs: config and tensors are read
    as data. Every tensor is checked by name and shape before anything is written."""
    src = Path(src)
    source = TensorSource(src)
    pre = src / "preprocessor_config.json"
    try:
        config = conf.ov15_from_hf(read_json(src / "config.json"), read_json(pre) if pre.exists() else None)
    except conf.UnsupportedConfig as e:
        raise ConvertError(f"{src / 'config.json'}: {e}") from None
    notes = [f"LLaVA-OneVision-1.5 release layout; pixels per image {config.vision.min_pixels}..{config.vision.max_pixels}"
             + ("" if pre.exists() else " (no preprocessor_config.json: the 4B release's defaults)")]
    tok_dir = next((Path(c) for c in (tokenizer, src) if c is not None and has_tokenizer(c)), None)
    tok = ov15_tokenizer(tok_dir, config, notes) if tok_dir is not None else None
    if tok is None:
        notes.append("no tokenizer found: the checkpoint has none (export will need --tokenizer)")
    plan = _plan(source, config, hf.OV15_RELEASE, _shapes(config), lambda p: True)
    result = ImportResult(Path(out), config, "llava-ov-1.5", _source_dtype(source), [], _ignored(plan, source), notes)
    log(f"writing {out} ...")
    _save(Path(out), plan, {}, result, tok, progress)
    return result


def import_clip_lm(
    vision: str | Path,
    llm: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    projector_type: str = "mlp2x_gelu",
    feature_layer: int = -2,
    select_strategy: str = "default",
    seed: int = 0,
    chat_template: str = "",
    progress: bool = True,
    log: Log = print,
) -> ImportResult:
    """A CLIP (vision) + causal LM (Phi-2, StableLM-2, Phi-3, Qwen2, Qwen3) pair -> checkpoint with a
    freshly initialised projector; ``chat_template`` as for ``import_llava``. An MLCD / RICE-ViT
    tower instead of CLIP makes a LLaVA-OneVision-1.5 stage-0 model (``import_rice_lm``)."""
    clip, lm = TensorSource(vision), TensorSource(llm)
    if hf.mlcd_layout(clip.names) is not None:
        return import_rice_lm(vision, llm, out, tokenizer=tokenizer, seed=seed, progress=progress, log=log)
    try:
        clip_layout = hf.clip_layout(clip.names)
        lm_layout = hf.lm_layout(lm.names)
    except hf.UnknownLayout as e:
        raise ConvertError(f"{vision if 'CLIP' in str(e) else llm}: {e}") from None
    try:
        config = LlavaConfig(
            vision=conf.vision_from_hf(read_json(Path(vision) / "config.json"), feature_layer, select_strategy),
            text=conf.text_from_hf(read_json(Path(llm) / "config.json"), lm_head_bias="lm_head.bias" in lm.names),
            projector_type=projector_type,
        )
    except conf.UnsupportedConfig as e:
        raise ConvertError(str(e)) from None
    notes = [f"lm_head bias: {'present' if config.text.lm_head_bias else 'absent'}"]
    config, tok = _tokenizer([tokenizer, llm], config, notes, log, chat_template)
    shapes = _shapes(config)
    layout_v = dataclasses.replace(clip_layout, projector="")
    is_vision = lambda p: p[0] == "vision"  # noqa: E731
    is_llm = lambda p: p[0] == "llm"  # noqa: E731
    plan = _plan(clip, config, layout_v, shapes, is_vision) + _plan(lm, config, lm_layout, shapes, is_llm)
    projector = _fresh_projector(config, seed)
    fresh = [f"projector/{k}" for k in projector]
    notes.insert(0, f"projector ({projector_type}) freshly initialised (seed {seed}): {', '.join(fresh)}; "
                    "everything else loaded from the CLIP and language-model weights")
    result = ImportResult(checkpoints.as_dir(out), config, f"clip+{config.text.family}", _source_dtype(clip, lm), fresh,
                          _ignored(plan, clip, lm), notes)
    log(f"writing {out} ...")
    _save(checkpoints.as_dir(out), plan, {"projector": projector}, result, tok, progress)
    return result


def import_rice_lm(vision: str | Path, llm: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                   seed: int = 0, progress: bool = True, log: Log = print) -> ImportResult:
    """LLaVA-OneVision-1.5's stage-0 merge: an MLCD-layout RICE-ViT (its ``post_layernorm``
    dropped) + a causal LM (Qwen3) + a freshly initialised 2 x 2 merger, as the authors' merge
    does: a tied LM gets ``embed_tokens`` copied into an untied ``lm_head``. The Qwen2-VL chat
    format; ``image_token_id`` is the tokenizer's ``<|image_pad|>``."""
    rice_src, lm = TensorSource(vision), TensorSource(llm)
    try:
        vision_layout, lm_layout = hf.mlcd_layout(rice_src.names), hf.lm_layout(lm.names)
        vcfg = conf.rice_from_mlcd(read_json(Path(vision) / "config.json"))
        text = conf.text_from_hf(read_json(Path(llm) / "config.json"), lm_head_bias="lm_head.bias" in lm.names)
    except (hf.UnknownLayout, conf.UnsupportedConfig) as e:
        raise ConvertError(str(e)) from None
    notes = [f"MLCD/RICE-ViT tower from {vision} (post_layernorm dropped), language model from {llm}"]
    if text.tie_word_embeddings:
        lm_layout = dataclasses.replace(lm_layout, head=lm_layout.text + "embed_tokens.")
        notes.append("the language model ties its head: embed_tokens copied into an untied lm_head")
    config = LlavaConfig(vision=vcfg, text=dataclasses.replace(text, tie_word_embeddings=False), projector_type="merger",
                         chat_template="qwen2vl")
    tok_dir = next((Path(c) for c in (tokenizer, llm) if c is not None and has_tokenizer(c)), None)
    tok = None
    if tok_dir is not None:
        from allava_jax.data.tokenizer import load_tokenizer

        ids = load_tokenizer(tok_dir).encode(IMAGE_PAD, add_special_tokens=False)
        if len(ids) != 1:
            raise ConvertError(f"{tok_dir}: the tokenizer has no {IMAGE_PAD} token (a Qwen2/Qwen3 tokenizer has)")
        config = config.replace(image_token_id=ids[0])
        tok = ov15_tokenizer(tok_dir, config, notes)
    else:
        notes.append(f"no tokenizer found: image_token_id stays {config.image_token_id}")
    shapes = _shapes(config)
    plan = (_plan(rice_src, config, vision_layout, shapes, lambda p: p[0] == "vision")
            + _plan(lm, config, lm_layout, shapes, lambda p: p[0] == "llm"))
    projector = _fresh_projector(config, seed)
    fresh = [f"projector/{k}" for k in projector]
    notes.insert(0, f"merger freshly initialised (seed {seed}): {', '.join(fresh)}")
    result = ImportResult(Path(out), config, f"rice+{config.text.family}", _source_dtype(rice_src, lm), fresh,
                          _ignored(plan, rice_src, lm), notes)
    log(f"writing {out} ...")
    _save(Path(out), plan, {"projector": projector}, result, tok, progress)
    return result


def import_clip(src: str | Path, out: str | Path, *, tokenizer: str | Path | None = None, progress: bool = True,
                log: Log = print) -> ImportResult:
    """An HF ``CLIPModel`` directory (ViT-B/32, ViT-L/14, ...; both towers) -> a CLIP scorer
    checkpoint for ``allava_jax.curate``, with its tokenizer."""
    src = Path(src)
    source = TensorSource(src)
    try:
        config = conf.clip_from_hf(read_json(src / "config.json"))
    except conf.UnsupportedConfig as e:
        raise ConvertError(f"{src / 'config.json'}: {e}") from None
    if "text_model.embeddings.token_embedding.weight" not in source.names:
        raise ConvertError(f"{src}: not a CLIPModel state dict (no 'text_model.embeddings.token_embedding.weight')")
    tok_dir = next((Path(c) for c in (tokenizer, src) if c is not None and has_tokenizer(c)), None)
    if tok_dir is None:
        raise ConvertError(f"{src}: no tokenizer files (pass --tokenizer DIR): a scorer must tokenize captions")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok.convert_tokens_to_ids(tok.eos_token) != config.text.eos_token_id and config.text.eos_token_id != 2:
        raise ConvertError(f"{tok_dir}: tokenizer EOS {tok.eos_token!r} is not the config's eos_token_id "
                           f"{config.text.eos_token_id}")
    _check_clip_preprocessing(src / "preprocessor_config.json", config.vision.image_size)
    plan = _plan(source, config, hf.CLIP_MODEL, nn.unbox(abstract_clip_params(config)), lambda p: True)
    result = ImportResult(checkpoints.as_dir(out), config, "clip", _source_dtype(source), [], _ignored(plan, source),
                          [f"tokenizer from {tok_dir}"])
    log(f"writing {out} ...")
    _save(checkpoints.as_dir(out), plan, {}, result, tok, progress)
    return result


def _check_clip_preprocessing(path: Path, image_size: int) -> None:
    """The scorer preprocesses as OpenAI's CLIP does (its mean/std, crop = tower size); refuse a
    directory whose image processor says otherwise rather than score it wrongly."""
    if not path.exists():
        return
    d = read_json(path)
    mean, std = tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD))
    crop = d.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if not (np.allclose(mean, CLIP_MEAN) and np.allclose(std, CLIP_STD)) or crop != image_size:
        raise ConvertError(f"{path}: image_mean {mean}, image_std {std}, crop {crop}: the scorer supports "
                           f"OpenAI CLIP's normalisation and a {image_size} px crop only")


def summary(result: ImportResult) -> str:
    """Human-readable lines for the CLI."""
    c = result.config
    if isinstance(c, ClipConfig):
        return "\n".join([
            f"imported CLIP scorer ({result.source_dtype}) -> {result.checkpoint}",
            f"  vision: {c.vision.num_layers} layers x {c.vision.hidden_size}, {c.vision.image_size} px, patch "
            f"{c.vision.patch_size}; text: {c.text.num_layers} layers x {c.text.hidden_size}, vocab "
            f"{c.text.vocab_size}, {c.text.max_position_embeddings} tokens; projection {c.projection_dim}",
            *(f"  note: {n}" for n in result.notes),
            f"  ignored {len(result.ignored)} source tensor(s)" + (f": {', '.join(result.ignored[:5])}" if result.ignored else ""),
        ])
    lines = [
        f"imported {result.source} ({result.source_dtype}) -> {result.checkpoint}",
        f"  vision: {c.vision.num_layers} layers x {c.vision.hidden_size}, {c.vision.image_size} px, "
        f"feature_layer {c.vision.feature_layer} ({c.vision.select_strategy}); projector {c.projector_type}; "
        f"llm: {c.text.num_layers} layers x {c.text.hidden_size}, vocab {c.text.vocab_size}; "
        f"image_token_id {c.image_token_id}",
        *(f"  note: {n}" for n in result.notes),
        f"  freshly initialised: {', '.join(result.fresh) if result.fresh else 'nothing'}",
    ]
    if result.ignored:
        shown = ", ".join(result.ignored[:5]) + (" ..." if len(result.ignored) > 5 else "")
        lines.append(f"  ignored {len(result.ignored)} source tensor(s) not in our model: {shown}")
    return "\n".join(lines)
