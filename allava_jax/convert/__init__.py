"""Checkpoint porting: Hugging Face CLIP / Phi / Llava and original ALLaVA weights in, HF Llava out.

``python -m allava_jax.convert import|export``; the functions behind it are
``importer.import_llava``, ``importer.import_clip_lm`` and ``exporter.export_checkpoint``. The
name/layout table both directions share is ``hf.param_specs``.
"""
