"""Chat rendering and label masks: exact trained tokens, prefix checks, the train/serve round-trip."""

import pytest

from assistant.chat_format import IGNORE_INDEX, TemplateError, encode_chat, encode_prompt, render_chat
from assistant.models import load_tokenizer

CHAT = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "Could I get your full name, please?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("embedded")


def trained_runs(tokenizer, encoded) -> list[str]:
    """Decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token, "a label must be the token at its own position"
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_every_assistant_turn_is_trained_with_its_end_of_turn_token(tokenizer):
    encoded = encode_chat(tokenizer, CHAT)
    assert trained_runs(tokenizer, encoded) == [
        "Hello! How can I help?<|im_end|>\n",
        "Could I get your full name, please?<|im_end|>\n",
    ]


def test_exact_mask_positions(tokenizer):
    encoded = encode_chat(tokenizer, CHAT)
    ids = encoded.input_ids
    trained = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    first_start = len(encode_prompt(tokenizer, CHAT[:2]))
    first_end = len(tokenizer(render_chat(tokenizer, CHAT[:3]), add_special_tokens=False)["input_ids"])
    second_start = len(encode_prompt(tokenizer, CHAT[:4]))
    assert trained == list(range(first_start, first_end)) + list(range(second_start, len(ids)))
    assert ids[first_end - 2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_what_the_app_renders_is_the_prefix_the_trainer_trained_on(tokenizer):
    encoded = encode_chat(tokenizer, CHAT)
    for turn in (2, 4):
        served = encode_prompt(tokenizer, CHAT[:turn])  # the app's prompt before this reply
        assert encoded.input_ids[: len(served)] == served
        assert encoded.labels[len(served) - 1] == IGNORE_INDEX
        assert encoded.labels[len(served)] != IGNORE_INDEX


def test_user_and_system_tokens_carry_no_loss(tokenizer):
    encoded = encode_chat(tokenizer, CHAT)
    text = tokenizer.decode([t for t, lab in zip(encoded.input_ids, encoded.labels) if lab != IGNORE_INDEX])
    assert "support agent" not in text and "Where is my order" not in text


def test_truncation_keeps_the_start_and_reports_it(tokenizer):
    encoded = encode_chat(tokenizer, CHAT, max_length=20)
    assert encoded.truncated and len(encoded.input_ids) == 20 and encoded.trained_tokens == 0


def test_a_template_that_is_not_prefix_preserving_names_the_turn(tokenizer):
    # Like reasoning templates: the generation prompt opens a block the finished turn does not have.
    tokenizer = load_tokenizer("embedded")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    with pytest.raises(TemplateError, match=r"turn 2 .*messages\[2\]"):
        encode_chat(tokenizer, CHAT)
