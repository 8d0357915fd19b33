"""Evaluation through lmms-eval (optional dependency: ``pip install -r requirements-eval.txt``).

``model.AllavaJax`` is an lmms-eval model class for our checkpoints (registered as ``allava_jax``);
``runner.evaluate`` runs lmms-eval's own tasks and scoring; ``python -m allava_jax.eval`` is the CLI.
Nothing here imports lmms-eval until it is used.
"""
