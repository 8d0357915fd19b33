"""lmms-eval model class for allava-jax checkpoints.

Prompts follow the model's chat template (ALLaVA's: ``[INST] <image>\\n{question} [/INST] ``);
images come from the task's ``doc_to_visual`` as PIL images and are preprocessed exactly as in
training. Requests are generated in batches that share one prefill and one decode loop.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from allava_jax.errors import UserError
from allava_jax.eval.scoring import Scorer
from allava_jax.infer import media
from allava_jax.infer.engine import Engine, Prompt
from allava_jax.infer.loading import load_engine
from allava_jax.infer.prompts import IMAGE_PLACEHOLDER, single_turn
from allava_jax.infer.sampling import SamplingParams

log = logging.getLogger(__name__)


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def sampling_from_gen_kwargs(gen_kwargs: dict, default_max_new_tokens: int) -> SamplingParams:
    """lmms-eval ``generation_kwargs`` (HF-style names) -> our SamplingParams."""
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    top_p = gen_kwargs.get("top_p")
    return SamplingParams(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        temperature=temperature,
        top_p=float(top_p) if top_p else 1.0,
        top_k=int(gen_kwargs.get("top_k") or 0),
        seed=int(gen_kwargs.get("seed") or 0),
        stop=tuple(until),
    )


@register_model("allava_jax")
class AllavaJax(lmms):
    """``--model allava_jax --model_args checkpoint=DIR[,batch_size=8,dtype=bfloat16,max_new_tokens=128]``."""

    def __init__(
        self,
        checkpoint: str | None = None,
        engine: Engine | None = None,
        batch_size: int | str = 8,
        max_new_tokens: int = 128,
        dtype: str | None = None,
        tokenizer: str | None = None,
        max_len: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if engine is None:
            if checkpoint is None:
                raise UserError("allava_jax needs checkpoint=DIR")
            engine = load_engine(checkpoint, tokenizer=tokenizer, dtype=dtype, max_len=int(max_len) if max_len else None)
        self.engine = engine
        self.batch_size = max(1, int(batch_size or 1))
        self.max_new_tokens = int(max_new_tokens)
        self._scorer: Scorer | None = None
        if kwargs:
            log.warning("ignoring unknown allava_jax model args: %s", sorted(kwargs))

    # ----- helpers -----------------------------------------------------------------------------

    def _pixels(self, visuals: Sequence[Any]) -> np.ndarray | list | None:
        images = [v for v in _flatten(visuals) if isinstance(v, Image.Image)]
        if len(images) != len(_flatten(visuals)):
            raise UserError("allava_jax handles image inputs only (no video or audio)")
        if not images:
            return None
        vision = self.engine.config.vision
        return media.stack([media.from_pil(im, vision) for im in images], vision)

    def _prompt(self, context: str, pixels: np.ndarray | list | None) -> Prompt:
        n = 0 if pixels is None else len(pixels)
        rounds = single_turn(context, n) if IMAGE_PLACEHOLDER not in context else [(context, None)]
        return self.engine.prompt(rounds, pixels)

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    # ----- lmms-eval API -----------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = [""] * len(requests)
        work = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            pixels = self._pixels(doc_to_visual(self._doc(task, split, doc_id)))
            work.append((i, self._prompt(context, pixels), sampling_from_gen_kwargs(dict(gen_kwargs), self.max_new_tokens)))
        work.sort(key=lambda w: len(w[1].ids))  # similar lengths batch with less padding
        for start in range(0, len(work), self.batch_size):
            chunk = work[start : start + self.batch_size]
            completions = self.engine.generate([w[1] for w in chunk], [w[2] for w in chunk])
            for (i, _, _), completion in zip(chunk, completions):
                answers[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """(loss, is_greedy) per request, lmms-eval's convention (its built-in models return the
        mean negative log-likelihood per continuation token and its multiple-choice scoring takes
        the argmin). Wrapped in ``GenerationResult`` because lmms-eval 0.7.3's
        ``unwrap_generation_output`` turns any other non-string output into ``str(tuple)``, which
        its own multiple-choice scoring then cannot unpack."""
        if self._scorer is None:
            self._scorer = Scorer(self.engine)
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            prompt = self._prompt(context, self._pixels(doc_to_visual(doc)))
            cont_ids = self.engine.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            logp, greedy = self._scorer.loglikelihood(prompt, cont_ids)
            results.append(GenerationResult(text=(-logp / max(len(cont_ids), 1), greedy)))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round tasks, lmms-eval's protocol: round 0 asks the request's context; each later
        round asks what ``doc_to_text(doc, previous_output=..., round_idx=i, previous_round_info=...)``
        returns, ``(visuals, text, terminal, previous_output, info)``, until ``terminal``. Unlike
        lmms-eval's own models, which prompt every round afresh, each round here is one more turn
        of one conversation in the chat template: a round sees the earlier questions, our answers
        and every image so far. Requests advance round by round, batched. Returns each request's
        answers, one per round."""
        convs = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            pixels = self._pixels(doc_to_visual(doc))
            convs.append({"doc": doc, "doc_to_text": doc_to_text, "rounds": [], "info": None,
                          "pixels": [] if pixels is None else list(pixels),
                          "question": single_turn(context, 0 if pixels is None else len(pixels))[0][0],
                          "sampling": sampling_from_gen_kwargs(dict(gen_kwargs), self.max_new_tokens)})
        live = list(range(len(convs)))
        while live:
            for start in range(0, len(live), self.batch_size):
                chunk = [convs[i] for i in live[start : start + self.batch_size]]
                prompts = [self.engine.prompt(c["rounds"] + [(c["question"], None)],
                                              media.stack(c["pixels"], self.engine.config.vision)) for c in chunk]
                for c, completion in zip(chunk, self.engine.generate(prompts, [c["sampling"] for c in chunk])):
                    c["rounds"].append((c["question"], completion.text))
            still = []
            for i in live:
                c = convs[i]
                step = c["doc_to_text"](c["doc"], previous_output=[a for _, a in c["rounds"]],
                                        round_idx=len(c["rounds"]), previous_round_info=c["info"])
                if not (isinstance(step, tuple) and len(step) == 5) or step[2]:
                    continue  # terminal (or a task that returns a plain prompt: one round only)
                visuals, text, _, _, c["info"] = step
                new = self._pixels(visuals)
                c["pixels"] += [] if new is None else list(new)
                c["question"] = single_turn(text, 0 if new is None else len(new))[0][0]
                still.append(i)
            live = still
        answers = [[a for _, a in c["rounds"]] for c in convs]
        for request, a in zip(requests, answers):
            self.cache_hook.add_partial("generate_until_multi_round", request.args, a)
        return answers
