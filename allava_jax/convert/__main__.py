"""``python -m allava_jax.convert import|export``: checkpoint porting from/to Hugging Face.

    python -m allava_jax.convert import --src DIR --out CKPT               # HF Llava or original ALLaVA
    python -m allava_jax.convert import --vision CLIP_DIR --llm LM_DIR --out CKPT
    python -m allava_jax.convert import --clip CLIP_DIR --out SCORER              # a CLIPModel, for curate
    python -m allava_jax.convert export --checkpoint CKPT --out DIR [--dtype bfloat16]
    python -m allava_jax.convert import --src LLAVA_OV_1_5_DIR --out CKPT       # LLaVA-OneVision-1.5 release
    python -m allava_jax.convert import --vision RICE_DIR --llm QWEN3_DIR --out CKPT   # its stage-0 merge
    python -m allava_jax.convert export --checkpoint CKPT --out DIR --format llava-ov-1.5
"""

from __future__ import annotations

import argparse
import sys

from allava_jax import storage
from allava_jax.convert.errors import ConvertError
from allava_jax.convert.writer import parse_size
from allava_jax.data.templates import CHAT_TEMPLATES
from allava_jax.errors import report_user_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m allava_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="local HF / original ALLaVA weights -> our checkpoint")
    imp.add_argument("--src", help="an HF LlavaForConditionalGeneration, original LLaVA/ALLaVA or LLaVA-OneVision-1.5 directory")
    imp.add_argument("--vision", help="a CLIPVisionModel/CLIPModel directory (with --llm; or the tower for --src), or "
                                      "an MLCD/RICE-ViT one (with a Qwen3 --llm: a LLaVA-OneVision-1.5 stage-0 model)")
    imp.add_argument("--llm", help="a Phi-2 / StableLM-2 / Phi-3 / Qwen2 / Qwen3 *ForCausalLM directory (with --vision)")
    imp.add_argument("--clip", help="a CLIPModel directory (both towers) -> a scorer for `allava_jax.curate`")
    imp.add_argument("--tokenizer", help="tokenizer directory (default: --src, --llm or --clip)")
    imp.add_argument("--out", required=True, help="checkpoint directory to write")
    imp.add_argument("--seed", type=int, default=0, help="projector init seed (--vision + --llm)")
    imp.add_argument("--chat-template", default="", choices=("", *CHAT_TEMPLATES),
                     help="the model's conversation template (default: the decoder family's: phi3 for "
                          "Phi-3, allava for the others)")
    imp.add_argument("--no-progress", action="store_true")
    exp = sub.add_parser("export", help="our checkpoint -> HF LlavaForConditionalGeneration directory")
    exp.add_argument("--checkpoint", required=True, help="checkpoint root, step directory or training workdir")
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--dtype", default="auto", help="auto (the imported dtype, else float32) | float32 | bfloat16 | float16")
    exp.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    exp.add_argument("--max-shard-size", default="5GB", help="safetensors shard limit (e.g. 5GB, 500MB)")
    exp.add_argument("--drop-lm-head-bias", action="store_true", help="export a model whose lm_head has a bias")
    exp.add_argument("--format", default="hf-llava", choices=("hf-llava", "llava-ov-1.5"),
                     help="hf-llava: transformers' LlavaForConditionalGeneration; llava-ov-1.5: the "
                          "LLaVA-OneVision-1.5 release layout (rice tower + merger + Qwen3 models)")
    exp.add_argument("--no-progress", action="store_true")
    return p


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Any path may be on a bucket (gs://): fail in seconds on a missing bucket or no permission.
    # Model directories to read are copied to the local cache once (safetensors maps local files).
    for name in ("src", "vision", "llm", "clip", "tokenizer", "checkpoint"):
        if getattr(args, name, None):
            storage.check_access(getattr(args, name))
            if name != "checkpoint" and storage.is_remote(getattr(args, name)):
                setattr(args, name, str(storage.local_dir(getattr(args, name))))
    storage.check_access(args.out, write=True)
    if args.command == "import":
        from allava_jax.convert import importer

        if sum(map(bool, (args.src, args.llm, args.clip))) > 1:
            raise ConvertError("give one of --src DIR, --vision CLIP_DIR --llm LM_DIR, or --clip CLIP_DIR")
        if args.clip:
            result = importer.import_clip(args.clip, args.out, tokenizer=args.tokenizer, progress=not args.no_progress)
        elif args.src:
            result = importer.import_llava(
                args.src, args.out, vision=args.vision, tokenizer=args.tokenizer, chat_template=args.chat_template,
                progress=not args.no_progress,
            )
        elif args.vision and args.llm:
            result = importer.import_clip_lm(
                args.vision, args.llm, args.out, tokenizer=args.tokenizer, seed=args.seed,
                chat_template=args.chat_template, progress=not args.no_progress,
            )
        else:
            raise ConvertError("import needs --src DIR, --vision CLIP_DIR and --llm LM_DIR, or --clip CLIP_DIR")
        print(importer.summary(result))
    else:
        from allava_jax.convert import exporter

        result = exporter.export_checkpoint(
            args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
            drop_lm_head_bias=args.drop_lm_head_bias, max_shard_size=parse_size(args.max_shard_size),
            progress=not args.no_progress, format=args.format,
        )
        print(exporter.summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
