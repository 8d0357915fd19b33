"""Chat templates: exact ids and loss masks, image placeholder expansion, truncation, bad turns."""

import numpy as np
import pytest

from allava_jax.data import templates as T
from data_fixtures import (PHI3_CHAT_TEMPLATE, PHI3_CHAT_TOKENS, expand_reference_images, make_bpe_tokenizer,
                           make_tokenizer, reference_allava_ids)

N_IMG = 4


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _enc(tok, record, template="allava", num_images=None, seq_len=512, truncate=True):
    n = len(T.image_paths(record)) if num_images is None else num_images
    return T.encode_record(
        record, tok, template=template, num_images=n, seq_len=seq_len, eos_id=tok.eos_token_id,
        image_token_id=999, num_image_tokens=N_IMG, truncate=truncate,
    )


def _ids(tok, words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def test_allava_multi_turn_ids_and_loss_mask(tok):
    record = {"image": "a.jpg", "conversations": [
        {"from": "human", "value": "what is this ?\n<image>"},
        {"from": "gpt", "value": "a cat ."},
        {"from": "human", "value": "red or blue ?"},
        {"from": "gpt", "value": "blue"},
    ]}
    ex = _enc(tok, record)
    eos = tok.eos_token_id
    inst, end = _ids(tok, ["[", "INST", "]"]), _ids(tok, ["[/", "INST", "]"])
    # "[INST] <image>\nwhat is this ? [/INST] a cat .<eos>[INST] red or blue ? [/INST] blue<eos>"
    expected = (inst + [999] * N_IMG + _ids(tok, ["what", "is", "this", "?"]) + end
                + _ids(tok, ["a", "cat", "."]) + [eos]
                + inst + _ids(tok, ["red", "[UNK]", "blue", "?"]) + end + _ids(tok, ["blue"]) + [eos])
    is_answer = ([0] * (3 + N_IMG + 4 + 3) + [1, 1, 1, 1] + [0] * (3 + 4 + 3) + [1, 1])
    np.testing.assert_array_equal(ex["tokens"], expected)
    np.testing.assert_array_equal(ex["targets"][:-1], expected[1:])
    # loss_mask[t] <=> target t (= token t+1) is assistant text or its EOS; never on the last token.
    np.testing.assert_array_equal(ex["loss_mask"], np.array(is_answer[1:] + [0], bool))
    assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == bool
    answer_targets = ex["targets"][ex["loss_mask"]]
    np.testing.assert_array_equal(answer_targets, _ids(tok, ["a", "cat", "."]) + [eos] + _ids(tok, ["blue"]) + [eos])
    assert (ex["tokens"] == 999).sum() == N_IMG


def test_text_only_record_and_multi_image_order(tok):
    ex = _enc(tok, {"conversations": [{"from": "user", "value": "w1"}, {"from": "assistant", "value": "w2"}]})
    assert 999 not in ex["tokens"]
    two = {"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "w1 <image> w2 <image> w3"}, {"from": "gpt", "value": "w4"}]}
    ex = _enc(tok, two)
    toks = list(ex["tokens"])
    first = toks.index(999)
    # multi-image placeholders stay where the text puts them: w1, run, w2, run, w3
    assert toks[first - 1] == tok.convert_tokens_to_ids("w1")
    assert toks[first + N_IMG] == tok.convert_tokens_to_ids("w2")
    assert toks[first + N_IMG + 1: first + 2 * N_IMG + 1] == [999] * N_IMG
    assert not ex["loss_mask"][np.array(toks) == 999].any()


def test_plain_template(tok):
    record = {"image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\ndescribe the image"}, {"from": "gpt", "value": "a red dog"}]}
    ex = _enc(tok, record, template="plain")
    expected = [999] * N_IMG + _ids(tok, ["a", "red", "dog"]) + [tok.eos_token_id]
    np.testing.assert_array_equal(ex["tokens"], expected)
    np.testing.assert_array_equal(ex["loss_mask"], [0] * (N_IMG - 1) + [1, 1, 1, 1, 0])


@pytest.mark.parametrize("case", ["single_image", "multi_turn_image", "text_only", "multi_turn_text", "two_images"])
def test_ids_and_loss_mask_equal_the_reference_procedure(case):
    """A Phi-2-style byte-level BPE (" The" is one token): ours equal ALLaVA's per-turn ids."""
    from allava_jax.infer.prompts import encode_generation_prompt

    tok = make_bpe_tokenizer()
    img, n = tok.convert_tokens_to_ids("<image>"), 3
    human = {"from": "human"}
    records = {
        "single_image": (["x.jpg"], ["<image>\nWhat colour is the cat?", "The cat is red."]),
        "multi_turn_image": (["x.jpg"], ["<image>\nWhat colour is the cat? ", "The cat is red.",
                                         " Is it blue?", "Yes, it is blue.\n"]),
        "text_only": ([], ["What colour is the cat?", "The cat is red."]),
        "multi_turn_text": ([], ["What colour is the cat?", "The cat is red.", "Is it blue?", "No."]),
        "two_images": (["x.jpg", "y.jpg"], ["<image>\n<image>\nWhich cat is red?", "The first cat is red."]),
    }
    images, values = records[case]
    convs = [{**human, "value": v} if i % 2 == 0 else {"from": "gpt", "value": v} for i, v in enumerate(values)]
    ex = T.encode_record({"image": images, "conversations": convs}, tok, template="allava",
                         num_images=len(images), seq_len=512, eos_id=tok.eos_token_id,
                         image_token_id=img, num_image_tokens=n)
    ref_ids, ref_answer = expand_reference_images(*reference_allava_ids(tok, convs), img, n)
    np.testing.assert_array_equal(ex["tokens"], ref_ids)
    np.testing.assert_array_equal(ex["loss_mask"], ref_answer[1:] + [False])
    # The byte-level BPE really distinguishes the two tokenizations: "]", " ", "The", not "]", " The".
    space, the, space_the = (tok.convert_tokens_to_ids(t) for t in ("Ġ", "The", "ĠThe"))
    assert space_the != tok.unk_token_id and space in ref_ids and the in ref_ids
    # Generation prompt: the reference's ids with the last answer open, ending with the space.
    open_convs = convs[:-1] + [{"from": "gpt", "value": None}]
    rounds = [(convs[i]["value"], convs[i + 1]["value"]) for i in range(0, len(convs) - 2, 2)]
    rounds.append((convs[-2]["value"], None))
    prompt = encode_generation_prompt(tok, rounds, len(images), image_token_id=img, num_image_tokens=n)
    ref_prompt, _ = expand_reference_images(*reference_allava_ids(tok, open_convs), img, n)
    assert prompt == ref_prompt and prompt[-1] == space


@pytest.mark.parametrize("case", ["single_image", "multi_turn_text"])
def test_phi3_template_is_phi3s_own_chat_format(case):
    """The ``phi3`` template renders Phi-3's chat template text (rebuilt in data_fixtures), ends
    answers with ``<|end|>`` under the loss, and masks the turn framing; with special tokens at
    every boundary and a byte-level BPE, per-part ids equal the one-string ids."""
    from jinja2 import Template

    from allava_jax.infer.prompts import encode_generation_prompt

    tok = make_bpe_tokenizer(PHI3_CHAT_TOKENS)
    img, n = tok.convert_tokens_to_ids("<image>"), 3
    end = tok.convert_tokens_to_ids("<|end|>")
    values, images = {
        "single_image": (["<image>\nWhat colour is the cat?", "The cat is red."], ["x.jpg"]),
        "multi_turn_text": (["What colour is the cat?", "The cat is red.", " Is it blue? ", "No."], []),
    }[case]
    convs = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": v.strip() if i % 2 == 0 else v}
                for i, v in enumerate(values)]
    reference = Template(PHI3_CHAT_TEMPLATE)
    rounds = [(values[i], values[i + 1]) for i in range(0, len(values), 2)]

    parts = T.render(rounds, "phi3", len(images))
    text = "".join({"image": "<image>", "eos": "<|end|>"}.get(p.kind, p.text) for p in parts)
    full = reference.render(messages=messages, add_generation_prompt=False, eos_token="<|endoftext|>")
    assert full.endswith("<|end|>\n<|endoftext|>") and text == full[: -len("\n<|endoftext|>")]

    ex = T.encode_record({"image": images, "conversations": convs}, tok, template="phi3", num_images=len(images),
                         seq_len=512, eos_id=T.answer_end_id(tok, "phi3"), image_token_id=img, num_image_tokens=n)
    whole = tok(text.replace("<image>", "<image>" * n), add_special_tokens=False).input_ids
    np.testing.assert_array_equal(ex["tokens"], whole)
    # Loss on each answer and its <|end|> only.
    answers = [tok(v, add_special_tokens=False).input_ids + [end] for v in values[1::2]]
    under_loss = [int(t) for t, m in zip(ex["targets"], ex["loss_mask"]) if m]
    assert under_loss == [t for answer in answers for t in answer]

    # Generation prompt: Phi-3's add_generation_prompt text; generation stops at <|end|> or EOS.
    prompt_rounds = rounds[:-1] + [(rounds[-1][0], None)]
    prompt = encode_generation_prompt(tok, prompt_rounds, len(images), image_token_id=img, num_image_tokens=n,
                                      template="phi3")
    ref_prompt = reference.render(messages=messages[:-1], add_generation_prompt=True, eos_token="<|endoftext|>")
    assert prompt == tok(ref_prompt.replace("<image>", "<image>" * n), add_special_tokens=False).input_ids
    assert T.stop_ids(tok, "phi3") == (end, tok.eos_token_id)
    assert T.stop_ids(tok, "allava") == (tok.eos_token_id,)


def test_a_template_whose_tokens_the_tokenizer_lacks_is_a_clear_error():
    from allava_jax.errors import UserError

    with pytest.raises(UserError, match="'phi3' template needs '<\\|end\\|>' as one token"):
        T.answer_end_id(make_bpe_tokenizer(), "phi3")


def test_truncation_never_cuts_an_image_run(tok):
    record = {"image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\n" + "w1 " * 5}, {"from": "gpt", "value": "w2 " * 40}]}
    full = _enc(tok, record)
    cut = _enc(tok, record, seq_len=30)
    assert len(cut["tokens"]) == 30 and cut["loss_mask"].any() and not cut["loss_mask"][-1]
    np.testing.assert_array_equal(cut["tokens"], full["tokens"][:30])
    for seq_len in (3 + N_IMG - 1, 3 + 1):  # run would be cut -> dropped
        with pytest.raises(T.SampleError) as e:
            _enc(tok, record, seq_len=seq_len)
        assert e.value.reason == "too_long"
    with pytest.raises(T.SampleError) as e:
        _enc(tok, record, seq_len=30, truncate=False)
    assert e.value.reason == "too_long"
    # Truncation that removes every answer token is also a skip.
    with pytest.raises(T.SampleError) as e:
        _enc(tok, record, seq_len=3 + N_IMG + 5)
    assert e.value.reason == "too_long"


@pytest.mark.parametrize("conversations, n_images, reason", [
    (None, 0, "bad_turns"),
    ([], 0, "bad_turns"),
    ([{"from": "gpt", "value": "w1"}, {"from": "human", "value": "w2"}], 0, "bad_turns"),
    ([{"from": "human", "value": "w1"}], 0, "bad_turns"),
    ([{"from": "human", "value": "w1"}, {"from": "human", "value": "w2"}], 0, "bad_turns"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "w2"}], 0, "bad_turns"),
    ([{"from": "human", "value": "w1"}, {"from": "gpt", "value": "  "}], 0, "empty_answer"),
    ([{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2"}], 1, "image_count_mismatch"),
    ([{"from": "human", "value": "<image> w1"}, {"from": "gpt", "value": "w2"}], 0, "image_count_mismatch"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "w2"}], 1, "image_count_mismatch"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image> w2"}], 1, "image_count_mismatch"),
])
def test_bad_records(tok, conversations, n_images, reason):
    with pytest.raises(T.SampleError) as e:
        _enc(tok, {"conversations": conversations}, num_images=n_images)
    assert e.value.reason == reason
