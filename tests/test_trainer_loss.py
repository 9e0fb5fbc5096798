"""The training loss on a tiny in-process model: selective logits and packing change nothing but speed."""

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from assistant.chat_format import IGNORE_INDEX, encode_chat
from assistant.models import load_tokenizer
from tests.conftest import tiny_llama
from train.collate import ChatCollator
from train.trainer import ChatTrainer

CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Book a table for two."},
        {"role": "assistant", "content": "For what time?"},
        {"role": "user", "content": "7 pm"},
        {"role": "assistant", "content": "Done: a table for two at 7 pm."},
    ],
    [
        {"role": "user", "content": "What's the weather in Paris tomorrow?"},
        {"role": "assistant", "content": "Sunny."},
    ],
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = load_tokenizer("embedded")
    model = tiny_llama(len(tokenizer), max_positions=512).eval()
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), report_to=[], use_cpu=True)
    trainer = ChatTrainer(model=model, args=args)
    items = [
        {"input_ids": e.input_ids, "labels": e.labels} for e in (encode_chat(tokenizer, c) for c in CHATS)
    ]
    return tokenizer, model, trainer, items


def reference_loss(model, items) -> torch.Tensor:
    """Plain full-logits causal LM loss, one sequence at a time, summed over all trained tokens."""
    total, count = 0.0, 0
    for item in items:
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
        logits = model(input_ids=ids).logits[:, :-1]
        total = total + F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_loss_equals_full_logits_reference(setup, packed):
    tokenizer, model, trainer, items = setup
    batch = ChatCollator(tokenizer.pad_token_id, packed=packed)(items)
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        expected = reference_loss(model, items)
    assert torch.allclose(ours, expected, atol=1e-5), (ours, expected)


def test_packed_batch_has_no_padding_and_restarts_positions(setup):
    tokenizer, _, _, items = setup
    batch = ChatCollator(tokenizer.pad_token_id, packed=True)(items)
    lengths = [len(i["input_ids"]) for i in items]
    assert batch["input_ids"].shape == (1, sum(lengths))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, lengths[0], lengths[0] + lengths[1]]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)


def test_gradient_accumulation_normaliser_is_the_token_count(setup):
    tokenizer, model, trainer, items = setup
    batch = ChatCollator(tokenizer.pad_token_id)(items)
    count = int((batch["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        per_token = trainer.compute_loss(model, batch)
        halved = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(2 * count))
    assert torch.allclose(halved * 2, per_token, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_eval_loss_is_per_labelled_token_over_the_whole_set(setup, tmp_path, packed):
    """Batches of very different sizes: the Trainer's own mean of batch means would differ."""
    tokenizer, model, _, items = setup
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=2,
                             remove_unused_columns=False, label_names=["labels"])
    trainer = ChatTrainer(model=model, args=args, eval_dataset=items,
                          data_collator=ChatCollator(tokenizer.pad_token_id, packed=packed))
    with torch.no_grad():
        expected = float(reference_loss(model, items))
        batch_means = [float(reference_loss(model, items[:2])), float(reference_loss(model, items[2:]))]
    assert abs(sum(batch_means) / 2 - expected) > 1e-3, "the test data must tell the two means apart"
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0), (2, 0), (19, 0), (20, 1), (200, 10)])
def test_warmup_is_whole_steps_so_a_short_run_still_learns(tmp_path, steps, warmup):
    from types import SimpleNamespace

    from transformers import get_scheduler

    from assistant.models import pick_precision
    from train.pipeline import training_arguments
    from train.sft import SFTConfig

    config = SFTConfig(data="rows.jsonl", output_dir=str(tmp_path / "out"), max_steps=steps)
    args = training_arguments(config, SimpleNamespace(items=[0] * 8), True, pick_precision("fp32"))
    assert args.get_warmup_steps(steps) == warmup
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                             num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    # Every step after the warmup trains: a one-step run used to warm up for its only step, at rate 0.
    assert all(rate > 0 for rate in rates[warmup:]) and len(rates[warmup:]) == steps - warmup
