"""Data curation with a CLIP scorer: SynthVLM's CLIPScore / SSIM selection of image-caption pairs.

Above ``models`` and ``data`` (scoring needs both; ``data`` stays free of models). Entry point:
``python -m allava_jax.curate score ...``.
"""
