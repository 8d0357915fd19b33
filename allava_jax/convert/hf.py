"""Name and layout maps between Hugging Face state dicts and our param tree, both ways.

One table (``param_specs``) lists, for every leaf of our tree, the HF tensor(s) it comes from
and how the layout changes (PyTorch ``[out, in]`` Linear vs our ``[in, out]`` / per-head
kernels, ``[D, C, p, p]`` conv vs ``[p, p, C, D]``). Per-layer HF tensors are stacked along our
scanned ``layers`` axis. The same table drives import and export, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Collection, Iterator, Mapping

import numpy as np

from allava_jax.models.config import ClipConfig, LlavaConfig, TextConfig, VisionConfig

# Per-block parameters: our sub-path -> (HF sub-name, kind).
_CLIP_BLOCK = {
    ("self_attn", "q_proj"): ("self_attn.q_proj", "qkv"),
    ("self_attn", "k_proj"): ("self_attn.k_proj", "qkv"),
    ("self_attn", "v_proj"): ("self_attn.v_proj", "qkv"),
    ("self_attn", "out_proj"): ("self_attn.out_proj", "out"),
    ("layer_norm1",): ("layer_norm1", "norm"),
    ("layer_norm2",): ("layer_norm2", "norm"),
    ("mlp", "fc1"): ("mlp.fc1", "linear"),
    ("mlp", "fc2"): ("mlp.fc2", "linear"),
}


def decoder_block(t: TextConfig) -> list[tuple[tuple[str, ...], str, str, bool, tuple[int, int, int] | None]]:
    """One decoder block's leaves: (our sub-path, HF sub-name, kind, has bias, rows of a fused HF
    tensor as (start, stop, total) or None), for the config's family."""
    q, kv = t.num_heads * t.head_dim, t.kv_heads * t.head_dim
    norms = [(("input_layernorm",), "input_layernorm", "norm", t.norm == "layernorm", None)]
    if not t.parallel_residual:
        norms.append((("post_attention_layernorm",), "post_attention_layernorm", "norm", t.norm == "layernorm", None))
    if t.family == "phi3":  # q/k/v fused as qkv_proj, gate/up as gate_up_proj (gate first)
        total = q + 2 * kv
        attn = [(("self_attn", name), "self_attn.qkv_proj", "qkv", t.qkv_bias, rows)
                for name, rows in (("q_proj", (0, q, total)), ("k_proj", (q, q + kv, total)), ("v_proj", (q + kv, total, total)))]
    else:
        attn = [(("self_attn", name), f"self_attn.{name}", "qkv", t.qkv_bias, None) for name in ("q_proj", "k_proj", "v_proj")]
    if t.qk_norm:
        attn += [(("self_attn", name), f"self_attn.{name}", "norm", False, None) for name in ("q_norm", "k_norm")]
    out_name = "self_attn.dense" if t.family == "phi" else "self_attn.o_proj"
    attn.append((("self_attn", "dense"), out_name, "out", t.out_bias, None))
    if t.mlp == "fc":
        mlp = [(("mlp", "fc1"), "mlp.fc1", "linear", True, None), (("mlp", "fc2"), "mlp.fc2", "linear", True, None)]
    elif t.family == "phi3":
        n = t.intermediate_size
        mlp = [(("mlp", "gate_proj"), "mlp.gate_up_proj", "linear", False, (0, n, 2 * n)),
               (("mlp", "up_proj"), "mlp.gate_up_proj", "linear", False, (n, 2 * n, 2 * n))]
        mlp.append((("mlp", "down_proj"), "mlp.down_proj", "linear", False, None))
    else:
        mlp = [(("mlp", name), f"mlp.{name}", "linear", False, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return norms + attn + mlp


def final_norm_name(t: TextConfig) -> str:
    return "final_layernorm" if t.family == "phi" else "norm"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each part lives in a checkpoint's flat name space.

    ``projector_names`` gives the HF module name of linear 1..N (``linear_1`` in HF Llava,
    ``0``, ``2``, ... in original LLaVA's ``mm_projector`` nn.Sequential).
    """

    vision: str
    text: str
    head: str
    projector: str
    projector_names: tuple[str, ...] = ("linear_1", "linear_2")
    # A rice tower's names: "mlcd" (HF ``MLCDVisionModel``: CLIP's block names, separate q/k/v)
    # or "release" (LLaVA-OneVision-1.5's ``visual.*``: ``blocks.N.attn.qkv`` fused, ``norm1``).
    rice_names: str = "mlcd"


# transformers 5 in-memory names (LlavaForConditionalGeneration.state_dict()).
HF_LLAVA = Layout("model.vision_tower.", "model.language_model.", "lm_head.", "model.multi_modal_projector.")
# The legacy names hub checkpoints use (llava-hf/*, transformers 4 save_pretrained). Both
# transformers 4 and 5 load them, so ``export`` writes these.
HF_LLAVA_SAVED = Layout(
    "vision_tower.vision_model.", "language_model.model.", "language_model.lm_head.", "multi_modal_projector."
)
# What transformers 5.23 ``save_pretrained`` actually writes: legacy names, but the CLIP tower
# without its ``vision_model.`` level (checked: ``vision_tower.embeddings.*``).
HF_LLAVA_SAVED_V5 = dataclasses.replace(HF_LLAVA_SAVED, vision="vision_tower.")
# LLaVA-OneVision-1.5's released checkpoints (the authors' remote code's names on disk).
OV15_RELEASE = Layout("visual.", "model.", "lm_head.", "visual.merger.", ("mlp.0", "mlp.2"), rice_names="release")


# An HF ``CLIPModel`` directory as ``save_pretrained`` writes it (``vision_model.*``, ``text_model.*``).
CLIP_MODEL = Layout("", "", "", "")


def original_llava_layout(depth: int = 2, vision: str = "model.vision_tower.vision_tower.vision_model.") -> Layout:
    """The original LLaVA / ALLaVA training code's names (``model.mm_projector.0`` ...)."""
    names = tuple(str(2 * i) for i in range(depth))
    return Layout(vision, "model.", "lm_head.", "model.mm_projector.", names)


# Every spelling of a CLIP vision tower's prefix we accept, most specific first. ``""`` is a
# transformers 5 ``CLIPVisionModel.save_pretrained`` directory; ``vision_model.`` an older one or
# a ``CLIPModel`` (whose text tower is ignored).
VISION_PREFIXES = (
    "model.vision_tower.vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
    "vision_model.",
    "",
)
_VISION_PROBE = "embeddings.patch_embedding.weight"
_TEXT_PROBE = "embed_tokens.weight"


class UnknownLayout(ValueError):
    """The tensor names match none of the layouts we know."""


def find_vision_prefix(names: Collection[str], candidates: tuple[str, ...] = VISION_PREFIXES) -> str | None:
    """The prefix under which a CLIP vision tower's tensors live, or None if there is none."""
    for prefix in candidates:
        if prefix + _VISION_PROBE in names:
            return prefix
    return None


def detect_layout(names: Collection[str]) -> tuple[str, Layout]:
    """``("hf_llava" | "original", Layout)`` from a LLaVA checkpoint's tensor names.

    The original layout may lack the vision tower (LLaVA references the CLIP by name): then
    ``Layout.vision`` is ``""`` and the caller must load the tower from elsewhere.
    """
    names = set(names)
    if "model.mm_projector.0.weight" in names:
        depth = 1
        while f"model.mm_projector.{2 * depth}.weight" in names:
            depth += 1
        vision = find_vision_prefix(names, VISION_PREFIXES[:2]) or ""
        return "original", original_llava_layout(depth, vision)
    for projector in ("multi_modal_projector.", "model.multi_modal_projector."):
        if projector + "linear_1.weight" in names:
            text = next((t for t in ("language_model.model.", "model.language_model.") if t + _TEXT_PROBE in names), None)
            head = next((h for h in ("language_model.lm_head.", "lm_head.") if h + "weight" in names), "lm_head.")
            vision = find_vision_prefix(names, VISION_PREFIXES[1:5])
            if text is None or vision is None:
                missing = "language model" if text is None else "vision tower"
                raise UnknownLayout(f"a Llava checkpoint without a {missing} (no '*{_TEXT_PROBE}' / '*{_VISION_PROBE}')")
            return "hf_llava", Layout(vision, text, head, projector)
    raise UnknownLayout(
        "unknown architecture: no 'multi_modal_projector.linear_1.weight' (HF Llava) or "
        f"'model.mm_projector.0.weight' (original LLaVA/ALLaVA) tensor; first names: {sorted(names)[:5]}"
    )


def lm_layout(names: Collection[str]) -> Layout:
    """Layout of a ``*ForCausalLM`` directory (Phi-2, StableLM-2, Phi-3, Qwen2 as transformers writes it)."""
    names = set(names)
    if "model." + _TEXT_PROBE in names and any(n.startswith("model.layers.0.") for n in names):
        return Layout("", "model.", "lm_head.", "")
    if any(n.startswith("transformer.h.") or ".mixer.Wqkv." in n for n in names):
        raise UnknownLayout(
            "unknown architecture: this is the old remote-code Phi layout ('transformer.h.*.mixer.Wqkv'); "
            "load it in transformers and save_pretrained it as PhiForCausalLM first"
        )
    raise UnknownLayout(f"unknown architecture: not a *ForCausalLM state dict (no 'model.{_TEXT_PROBE}')")


def mlcd_layout(names: Collection[str]) -> Layout | None:
    """Layout of an ``MLCDVisionModel`` directory (``""`` or ``vision_model.`` prefix), or None."""
    prefix = next((p for p in ("vision_model.", "") if p + "class_pos_emb" in names), None)
    return None if prefix is None or prefix + _VISION_PROBE not in names else Layout(prefix, "", "", "")


def clip_layout(names: Collection[str]) -> Layout:
    """Layout of a ``CLIPVisionModel`` / ``CLIPModel`` directory (any spelling)."""
    prefix = find_vision_prefix(names, ("vision_model.", ""))
    if prefix is None:
        raise UnknownLayout(f"unknown architecture: not a CLIP vision tower (no '{_VISION_PROBE}')")
    return Layout(prefix, "", "", "")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One leaf of our tree: ``path`` <- HF tensor ``name`` (``{i}`` = layer index) of ``kind``;
    ``rows`` = (start, stop, total) when the leaf is a slice of a fused HF tensor's first dim."""

    path: tuple[str, ...]
    name: str
    kind: str
    layers: range | None = None  # HF layer indices stacked along our leading axis
    optional: bool = False
    rows: tuple[int, int, int] | None = None


def _linear_pair(path: tuple[str, ...], hf: str, kind: str, layers: range | None = None, *, bias: bool = True,
                 rows: tuple[int, int, int] | None = None) -> list[Spec]:
    if kind == "norm":
        specs = [Spec(path + ("scale",), hf + ".weight", "same", layers)]
        return specs + ([Spec(path + ("bias",), hf + ".bias", "same", layers)] if bias else [])
    specs = [Spec(path + ("kernel",), hf + ".weight", kind + "_w", layers, rows=rows)]
    return specs + ([Spec(path + ("bias",), hf + ".bias", kind + "_b", layers, rows=rows)] if bias else [])


def _clip_blocks(root: tuple[str, ...], prefix: str, layers: range) -> list[Spec]:
    """A CLIP tower's stacked encoder blocks (both towers share the block's names)."""
    specs = []
    for sub, (hf, kind) in _CLIP_BLOCK.items():
        specs += _linear_pair(root + sub, prefix + "encoder.layers.{i}." + hf, kind, layers)
    return specs


def _vision_specs(vision: VisionConfig, v: str) -> list[Spec]:
    specs = [
        Spec(("vision", "patch_embedding", "kernel"), v + "embeddings.patch_embedding.weight", "conv"),
        Spec(("vision", "class_embedding"), v + "embeddings.class_embedding", "same"),
        Spec(("vision", "position_embedding"), v + "embeddings.position_embedding.weight", "same"),
        *_linear_pair(("vision", "pre_layrnorm"), v + "pre_layrnorm", "norm"),
        *_linear_pair(("vision", "post_layernorm"), v + "post_layernorm", "norm"),
    ]
    n_run, n_all = vision.num_blocks_to_run, vision.num_layers
    for group, layers in (("layers", range(0, n_run)), ("unused_layers", range(n_run, n_all))):
        if len(layers):
            specs += _clip_blocks(("vision", group), v, layers)
    return specs


# RICE-ViT's release names of a block's leaves (q/k/v come from the fused ``attn.qkv``).
_RICE_BLOCK = {
    ("layer_norm1",): ("norm1", "norm"),
    ("layer_norm2",): ("norm2", "norm"),
    ("self_attn", "out_proj"): ("attn.proj", "out"),
    ("mlp", "fc1"): ("mlp.fc1", "linear"),
    ("mlp", "fc2"): ("mlp.fc2", "linear"),
}


def _rice_vision_specs(vision: VisionConfig, v: str, names: str) -> list[Spec]:
    """A rice tower in MLCD's names (``MLCDVisionModel``; its ``post_layernorm``, which only the
    pooled output uses, is not read) or the release's (``visual.*``)."""
    layers = range(vision.num_layers)
    if names == "mlcd":
        return [
            Spec(("vision", "patch_embedding"), v + "embeddings.patch_embedding.weight", "conv"),
            Spec(("vision", "class_embedding"), v + "embeddings.class_embedding", "same"),
            Spec(("vision", "class_pos_emb"), v + "class_pos_emb", "same"),
            *_linear_pair(("vision", "pre_layrnorm"), v + "pre_layrnorm", "norm"),
            *_clip_blocks(("vision", "layers"), v, layers),
        ]
    d = vision.hidden_size
    specs = [
        Spec(("vision", "patch_embedding"), v + "patch_embed.proj.weight", "conv"),
        Spec(("vision", "class_embedding"), v + "class_embedding", "same"),
        Spec(("vision", "class_pos_emb"), v + "class_pos_emb", "same"),
        *_linear_pair(("vision", "pre_layrnorm"), v + "pre_layernorm", "norm"),
    ]
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        specs += _linear_pair(("vision", "layers", "self_attn", name), v + "blocks.{i}.attn.qkv", "qkv", layers,
                              rows=(j * d, (j + 1) * d, 3 * d))
    for sub, (hf_name, kind) in _RICE_BLOCK.items():
        specs += _linear_pair(("vision", "layers") + sub, v + "blocks.{i}." + hf_name, kind, layers)
    return specs


def clip_model_specs(config: ClipConfig, prefix: str = "") -> list[Spec]:
    """Every leaf of a ``ClipModel`` tree in an HF ``CLIPModel`` state dict."""
    t = prefix + "text_model."
    return [
        *_vision_specs(config.vision, prefix + "vision_model."),
        Spec(("text", "token_embedding"), t + "embeddings.token_embedding.weight", "same"),
        Spec(("text", "position_embedding"), t + "embeddings.position_embedding.weight", "same"),
        *_clip_blocks(("text", "layers"), t, range(config.text.num_layers)),
        *_linear_pair(("text", "final_layer_norm"), t + "final_layer_norm", "norm"),
        Spec(("visual_projection", "kernel"), prefix + "visual_projection.weight", "linear_w"),
        Spec(("text_projection", "kernel"), prefix + "text_projection.weight", "linear_w"),
        Spec(("logit_scale",), prefix + "logit_scale", "same"),
    ]


def param_specs(config: LlavaConfig | ClipConfig, layout: Layout) -> list[Spec]:
    """Every leaf of our param tree with its source tensor(s) in ``layout``. For a ``ClipConfig``
    scorer, ``layout.vision`` is the prefix of the whole ``CLIPModel`` (``CLIP_MODEL``: none)."""
    if isinstance(config, ClipConfig):
        return clip_model_specs(config, layout.vision)
    t = layout.text
    if config.vision.kind == "rice":
        specs = _rice_vision_specs(config.vision, layout.vision, layout.rice_names)
    else:
        specs = _vision_specs(config.vision, layout.vision)
    if config.projector_type == "merger":
        specs += _linear_pair(("projector", "ln_q"), layout.projector + "ln_q", "norm")
    for i, hf_name in enumerate(layout.projector_names[: config.projector_depth], start=1):
        specs += _linear_pair(("projector", f"linear_{i}"), layout.projector + hf_name, "linear")
    specs.append(Spec(("llm", "embed_tokens", "embedding"), t + "embed_tokens.weight", "same"))
    text = config.text
    for sub, hf, kind, bias, rows in decoder_block(text):
        specs += _linear_pair(("llm", "layers") + sub, t + "layers.{i}." + hf, kind, range(text.num_layers),
                              bias=bias, rows=rows)
    specs += _linear_pair(("llm", "final_layernorm"), t + final_norm_name(text), "norm", bias=text.norm == "layernorm")
    if not config.text.tie_word_embeddings:
        specs.append(Spec(("llm", "lm_head", "kernel"), layout.head + "weight", "linear_w"))
        if config.text.lm_head_bias:
            specs.append(Spec(("llm", "lm_head", "bias"), layout.head + "bias", "linear_b"))
    elif config.text.lm_head_bias:
        specs.append(Spec(("llm", "lm_head_bias"), layout.head + "bias", "same"))
    return specs


def hf_to_ours(kind: str, x: np.ndarray, shape: tuple[int, ...], name: str = "") -> np.ndarray:
    """One HF tensor (one layer) -> our layout of ``shape``; errors name the tensor ``name``."""
    if x.size != int(np.prod(shape)):
        raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}; expected {int(np.prod(shape))} elements for {tuple(shape)} ({kind})")
    if kind in ("linear_w",):
        y = x.T
    elif kind == "qkv_w":  # [H*Dh, D] -> [D, H, Dh]
        y = x.T.reshape(shape)
    elif kind == "qkv_b":  # [H*Dh] -> [H, Dh]
        y = x.reshape(shape)
    elif kind == "out_w":  # [D, H*Dh] -> [H, Dh, D]
        y = x.T.reshape(shape)
    elif kind == "conv":  # [D, C, p, p] -> [p, p, C, D]
        y = x.transpose(2, 3, 1, 0)
    elif kind in ("same", "linear_b", "out_b"):
        y = x
    else:
        raise ValueError(f"unknown tensor kind {kind!r}")
    if y.shape != tuple(shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, which does not map to expected {tuple(shape)} ({kind})")
    return y


def ours_to_hf(kind: str, y: np.ndarray) -> np.ndarray:
    """Inverse of ``hf_to_ours`` for one layer."""
    if kind == "linear_w":
        return y.T
    if kind == "qkv_w":
        return y.reshape(y.shape[0], -1).T
    if kind == "qkv_b":
        return y.reshape(-1)
    if kind == "out_w":
        return y.reshape(-1, y.shape[-1]).T
    if kind == "conv":
        return y.transpose(3, 2, 0, 1)
    if kind in ("same", "linear_b", "out_b"):
        return y
    raise ValueError(f"unknown tensor kind {kind!r}")


def _get_path(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def plan_params(
    shape_of: Callable[[str], tuple[int, ...]],
    config: LlavaConfig,
    layout: Layout,
    shapes: Mapping,
    *,
    skip: Callable[[tuple[str, ...]], bool] = lambda path: False,
) -> list[tuple[Spec, tuple[int, ...]]]:
    """Check, from shapes alone, that every needed HF tensor exists and maps onto our leaf.

    ``shape_of(name)`` gives a source tensor's shape or raises ``KeyError``. Returns
    ``(spec, our leaf shape)`` for every leaf not skipped. Lets a streaming import fail cleanly
    before it writes anything.
    """
    plan = []
    for spec in param_specs(config, layout):
        if skip(spec.path):
            continue
        shape = tuple(_get_path(shapes, spec.path).shape)
        names = [spec.name] if spec.layers is None else [spec.name.format(i=i) for i in spec.layers]
        one = shape if spec.layers is None else shape[1:]
        for name in names:
            try:
                src = tuple(shape_of(name))
            except KeyError:
                raise KeyError(f"missing tensor {name!r}") from None
            if spec.rows is not None:
                start, stop, total = spec.rows
                if not src or src[0] != total:
                    raise ValueError(f"tensor {name!r} has shape {src}; expected {total} fused rows")
                src = (stop - start,) + src[1:]
            hf_to_ours(spec.kind, np.broadcast_to(np.zeros((), np.float32), src), one, name)
        plan.append((spec, shape))
    return plan


def num_tensors(spec: Spec) -> int:
    return 1 if spec.layers is None else len(spec.layers)


def read_leaf(
    read: Callable[[str], np.ndarray],
    spec: Spec,
    shape: tuple[int, ...],
    *,
    dtype=np.float32,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """One leaf of our tree from its HF tensor(s); stacked leaves are filled layer by layer into
    one preallocated array, so peak memory is the leaf plus one HF tensor."""
    if spec.layers is None:
        value = hf_to_ours(spec.kind, _read(read, spec.name, spec.rows), shape, spec.name).astype(dtype, copy=False)
        if progress:
            progress(1)
        return value
    value = np.empty(shape, dtype)
    for j, i in enumerate(spec.layers):
        name = spec.name.format(i=i)
        value[j] = hf_to_ours(spec.kind, _read(read, name, spec.rows), shape[1:], name)
        if progress:
            progress(1)
    return value


def load_params(
    read: Callable[[str], np.ndarray],
    config: LlavaConfig,
    layout: Layout,
    shapes: Mapping,
    *,
    skip: Callable[[tuple[str, ...]], bool] = lambda path: False,
    dtype=np.float32,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Build our param tree (numpy, ``dtype``) from HF tensors.

    ``read(name)`` returns one tensor as numpy or raises ``KeyError``; ``shapes`` is our tree of
    shapes (e.g. from ``abstract_params``); ``skip(path)`` leaves parts out (e.g. a projector that
    is freshly initialised). Errors name the tensor and the reason. ``progress(n)`` is called
    after every ``n`` HF tensors read.
    """
    params: dict = {}
    for spec in param_specs(config, layout):
        if skip(spec.path):
            continue
        shape = tuple(_get_path(shapes, spec.path).shape)
        _set_path(params, spec.path, read_leaf(read, spec, shape, dtype=dtype, progress=progress))
    return params


def _read(read: Callable[[str], np.ndarray], name: str, rows: tuple[int, int, int] | None = None) -> np.ndarray:
    try:
        x = np.asarray(read(name))
    except KeyError:
        raise KeyError(f"missing tensor {name!r}") from None
    if rows is None:
        return x
    start, stop, total = rows
    if x.shape[0] != total:
        raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}; expected {total} fused rows")
    return x[start:stop]


def export_tensors(params: Mapping, config: LlavaConfig, layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, tensor)`` one at a time (for streaming writers); the slices of a fused
    tensor (Phi-3's ``qkv_proj``, ``gate_up_proj``) are joined and yielded once complete."""
    pending: dict[str, list[np.ndarray]] = {}
    for spec in param_specs(config, layout):
        value = np.asarray(_get_path(params, spec.path))
        names = [spec.name] if spec.layers is None else [spec.name.format(i=i) for i in spec.layers]
        for j, name in enumerate(names):
            tensor = ours_to_hf(spec.kind, value if spec.layers is None else value[j])
            if spec.rows is None:
                yield name, tensor
                continue
            pending.setdefault(name, []).append(tensor)
            if spec.rows[1] == spec.rows[2]:  # the last slice
                yield name, np.concatenate(pending.pop(name), axis=0)
