"""Chat templates: exact ids and loss masks, image placeholder expansion, truncation, bad turns."""

import numpy as np
import pytest

from allava_jax.data import templates as T
from data_fixtures import make_tokenizer

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


def test_matches_whole_string_tokenization_with_bpe():
    """With a byte-level BPE, ids equal tokenizing the rendered conversation in one go."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["[INST] what colour is the cat? [/INST] The cat is red.", "Yes, it is blue."] * 50
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    img = tok.convert_tokens_to_ids("<image>")
    record = {"image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the cat?"}, {"from": "gpt", "value": "The cat is red."},
        {"from": "human", "value": "Is it blue?"}, {"from": "gpt", "value": "Yes, it is blue."}]}
    ex = T.encode_record(record, tok, template="allava", num_images=1, seq_len=512,
                         eos_id=tok.eos_token_id, image_token_id=img, num_image_tokens=3)
    text = ("[INST] <image>\nwhat colour is the cat? [/INST] The cat is red.<|endoftext|>"
            "[INST] Is it blue? [/INST] Yes, it is blue.<|endoftext|>")
    whole = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        whole += [img] * 3 if i == img else [i]
    np.testing.assert_array_equal(ex["tokens"], whole)
    answers = tok.decode(ex["targets"][ex["loss_mask"]])
    # The space after [/INST] belongs to the answer, merged (" The") or not (" " + "Yes"): the model
    # learns to emit it, so a generation prompt can end at "[/INST]".
    assert answers == " The cat is red.<|endoftext|> Yes, it is blue.<|endoftext|>"


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
