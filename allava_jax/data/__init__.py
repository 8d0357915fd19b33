"""Data: ALLaVA/LLaVA records -> packed, sharded batches (see DESIGN.md "Batch").

Modules, one job each:
  sources    JSON/JSONL (indexed once into ArrayRecord) and TFDS sources; mixtures with copies,
             per-record subsets and weighted draws
  images     decode (EXIF, any mode, first GIF frame), pad to square, bicubic resize, normalise
  templates  ALLaVA and LLaVA-plain chat templates: ids, next-token targets, loss mask
  examples   per-record work run in grain workers (returns BadSample instead of raising)
  quality    skip reasons, counting/logging, the bad-fraction stop
  packing    grain first-fit/best-fit packing with images carried per row; utilisation estimates
  binpack    offline bin packing: best-fit decreasing and LLaVA-OneVision-1.5's length buckets
  plan       `plan`: sample lengths from tokenizing alone -> packed rows (ArrayRecord + manifest)
  offline    the pipeline stage that builds a plan's rows (packing = "offline")
  pipeline   make_pipeline(...) -> grain DatasetIterator of batches; to_global_batch(...)
  prepare    TFDS ArrayRecord builder (records + image bytes)
  check      dataset validation report; CLI in __main__ (python -m allava_jax.data check|prepare|plan)

Heavy imports (grain, tfds, transformers) stay in the submodules.
"""
