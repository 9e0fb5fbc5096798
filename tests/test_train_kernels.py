"""Training speed-ups that must not change the maths: per-conversation attention and cheap dropout masks."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.conftest import tiny_llama
from train.attention import NAME, conversation_bounds, use_packed_attention
from train.dropout import FastDropout, use_fast_dropout


def packed_row(lengths: list[int]) -> dict[str, torch.Tensor]:
    """What train.collate gives a LoRA step: one row, positions restarting per conversation."""
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "position_ids": positions}


def loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(**batch, use_cache=False).logits  # as the trainer calls it (no cache: packed mask)
    loss = nn.functional.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:])
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_conversation_bounds_come_from_restarting_positions():
    query = key = torch.zeros(1, 4, 9, 16)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert conversation_bounds(positions, query, key) == [(0, 3), (3, 5), (5, 9)]
    # Not a packed row: one conversation, several rows, or a KV cache (query shorter than key).
    assert conversation_bounds(torch.arange(9)[None], query, key) is None
    assert conversation_bounds(positions.repeat(2, 1), query.repeat(2, 1, 1, 1), key) is None
    assert conversation_bounds(positions[:, -1:], query[:, :, -1:], key) is None


def test_packed_attention_matches_the_block_diagonal_mask():
    batch = packed_row([7, 12, 5, 20])
    model = tiny_llama()
    reference, reference_grads = loss_and_grads(model, batch)
    use_packed_attention(model)
    assert model.config._attn_implementation == NAME
    logits, grads = loss_and_grads(model, batch)
    assert torch.allclose(logits, reference, atol=1e-5)
    for got, expected in zip(grads, reference_grads, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)
    # Each conversation sees only itself: changing the first one leaves the others' logits alone.
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, :7] = (changed["input_ids"][0, :7] + 1) % 128
    with torch.no_grad():
        assert torch.allclose(model(**changed, use_cache=False).logits[0, 7:], logits[0, 7:], atol=1e-5)


def test_packed_attention_falls_back_to_sdpa_for_generation():
    model = tiny_llama().eval()
    prompt = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding, as the app batches
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    use_packed_attention(model)
    assert torch.equal(model.generate(prompt, **kwargs), expected)


def test_fast_dropout_has_dropout_statistics():
    drop = FastDropout(0.1).train()
    out = drop(torch.ones(1000, 1000))
    assert abs((out == 0).float().mean().item() - 0.1) < 0.003
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.9))
    assert abs(out.mean().item() - 1.0) < 0.01  # unbiased, like nn.Dropout
    assert torch.equal(drop.eval()(out), out)  # identity when evaluating
    x = torch.ones(64, 64, requires_grad=True)
    y = FastDropout(0.5).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient flows through kept elements only, scaled
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_fast_dropout_replaces_every_lora_dropout():
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert use_fast_dropout(model) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout | FastDropout)]
    assert drops and all(isinstance(m, FastDropout) and m.p == 0.05 for m in drops)
