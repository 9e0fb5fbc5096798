"""The registry on the real embedded model: one base for every adapter, mixed batches, folders that change or break."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from assistant.generation import GenerationParams, complete_reply
from assistant.loading import load_chat_model
from serve import registry as registry_module
from serve.registry import BASE_CHOICE, ChoiceError, ModelRegistry
from train.export.roundtrip import TIE_SWING

GREEDY = GenerationParams(max_new_tokens=10, temperature=0.0)
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


def random_adapter(folder: Path, config, seed: int) -> Path:
    """An adapter on the embedded model whose weights change replies (peft's own init would be a no-op)."""
    import torch
    from peft import get_peft_model

    from assistant.models import load_base_model, load_tokenizer, pick_precision

    torch.manual_seed(seed)
    model = get_peft_model(load_base_model("embedded", pick_precision("fp32")), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    load_tokenizer("embedded").save_pretrained(folder)
    return folder


def replies_together(registry: ModelRegistry, choices: list[str], monkeypatch) -> tuple[dict, list]:
    """Every choice's greedy reply to HELLO, all at once; and the (group, adapter names) of each batch run."""
    host = registry.get(choices[-1]).host
    runner, batches = host.runner, []
    monkeypatch.setattr(host, "runner", lambda group, names: batches.append((group, list(names))) or runner(group, names))
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda c=c: together.update({c: complete_reply(registry.get(c), HELLO, GREEDY)}))
               for c in choices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return together, batches


def scores_by_step(monkeypatch) -> dict[str | None, list]:
    """From now on, each row's scores at each step (what its greedy token is the argmax of), by adapter name:
    [(reply length, scores), ...] in the order they were computed."""
    from assistant import batching

    seen: dict[str | None, list] = {}
    pick = batching._MinTokens.__call__

    def recorded(self, input_ids, scores):
        for row, request in enumerate(self.batch):
            seen.setdefault(request.adapter, []).append((len(request.reply), scores[row].float().clone()))
        return pick(self, input_ids, scores)

    monkeypatch.setattr(batching._MinTokens, "__call__", recorded)
    return seen


def swing_where_they_part(steps: list) -> float:
    """Two greedy runs of one reply (the steps of the first, then of the second): where their tokens first differ,
    how far each prefers its own token over the other's, added (the export round trip's tie rule)."""
    first, second = {}, {}
    for length, scores in steps:
        (second if length in first else first)[length] = scores
    for length in sorted(set(first) & set(second)):
        a, b = first[length], second[length]
        mine, theirs = int(a.argmax()), int(b.argmax())
        if mine != theirs:
            return float(a[mine] - a[theirs] + b[theirs] - b[mine])
    return 0.0


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, lora_adapter) -> Path:
    """pirate (LoRA on q/v), sailor (LoRA on k/o/up: modules pirate leaves alone), prefix (prefix tuning)."""
    from peft import LoraConfig, PrefixTuningConfig

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(lora_adapter, root / "pirate")
    random_adapter(root / "sailor", LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
                                               task_type="CAUSAL_LM"), seed=1)
    random_adapter(root / "prefix", PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"), seed=2)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_adapters_share_one_base_and_decode_in_one_batch(adapters_dir, precision, monkeypatch):
    registry = ModelRegistry(adapters_dir, precision=precision)
    choices = [BASE_CHOICE, "pirate", "prefix", "sailor"]
    assert registry.choices == choices
    scores = scores_by_step(monkeypatch)
    solo = {c: complete_reply(registry.get(c), HELLO, GREEDY) for c in choices}
    assert len(set(solo.values())) == 4, f"every adapter changes the reply: {solo}"
    hosts = {id(registry.get(c).host) for c in choices}
    assert len(hosts) == 1 and len(registry._hosts) == 1, "every adapter is attached to one copy of the base"

    together, batches = replies_together(registry, choices, monkeypatch)
    if precision == "fp32":
        assert together == solo, "a reply decoded beside other adapters' equals its reply alone"
    else:  # int4 rounds each layer's sums to bf16: a batch's other rows move a logit by a bf16 step now and then
        for choice in choices:  # (seen: 0.25 at 28), and an exact tie (seen: sailor's 0.0) goes either way
            name = registry.get(choice).adapter_name
            assert together[choice] == solo[choice] or swing_where_they_part(scores[name]) < TIE_SWING, choice
    mixed = [names for group, names in batches if len(set(names)) >= 3]
    assert mixed, f"base and both LoRA adapters were not decoded in one batch: {batches}"
    if precision == "fp32":  # ...and equal to the adapter loaded on its own, the way train.eval loads it
        for choice in ("pirate", "prefix"):
            alone = load_chat_model(adapter=adapters_dir / choice, precision="fp32")
            assert complete_reply(alone, HELLO, GREEDY) == solo[choice]


def test_the_adapters_folder_is_read_again_and_staging_folders_never_appear(tmp_path, lora_adapter, monkeypatch):
    monkeypatch.setattr(registry_module, "SCAN_S", 0.0)
    registry = ModelRegistry(tmp_path)
    assert registry.choices == [BASE_CHOICE] and registry.default_choice() == BASE_CHOICE
    shutil.copytree(lora_adapter, tmp_path / ".support.partial-42")  # a killed run's staging folder (sorts first)
    shutil.copytree(lora_adapter, tmp_path / "support.partial")
    shutil.copytree(lora_adapter, tmp_path / "support")  # published while the app runs
    assert registry.choices == [BASE_CHOICE, "support"]
    assert registry.default_choice() == "support"


def test_the_adapter_given_on_the_command_line_is_the_default(tmp_path, lora_adapter):
    for name in ("alpha", ".alpha.partial"):
        shutil.copytree(lora_adapter, tmp_path / "adapters" / name)
    given = shutil.copytree(lora_adapter, tmp_path / "elsewhere" / "zeta")
    registry = ModelRegistry(tmp_path / "adapters", [str(given)])
    assert registry.choices == [BASE_CHOICE, "alpha", "zeta"]
    assert registry.default_choice() == "zeta"
    given_in_the_folder = ModelRegistry(tmp_path / "adapters", [str(tmp_path / "adapters" / "alpha")])
    assert given_in_the_folder.default_choice() == "alpha"


def test_a_malformed_adapter_folder_is_unavailable_with_its_reason(tmp_path, lora_adapter):
    shutil.copytree(lora_adapter, tmp_path / "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA",')  # cut off mid-write
    shutil.copytree(lora_adapter, tmp_path / "weightless")
    (tmp_path / "weightless" / "adapter_model.safetensors").unlink()
    registry = ModelRegistry(tmp_path)
    assert registry.choices == [BASE_CHOICE, "good"]
    assert set(registry.unavailable) == {"broken", "weightless"}
    assert "adapter_config.json: not valid JSON" in registry.unavailable["broken"].reason
    assert "no adapter weights" in registry.unavailable["weightless"].reason
    with pytest.raises(ChoiceError, match="broken.*unavailable.*adapter_config.json"):
        registry.get("broken")
    status = registry.describe("good")
    assert "Unavailable" in status and "broken" in status and "weightless" in status


@pytest.mark.slow
def test_a_failed_load_is_remembered_until_the_folder_changes(tmp_path, lora_adapter, monkeypatch):
    monkeypatch.setattr(registry_module, "SCAN_S", 0.0)
    shutil.copytree(lora_adapter, tmp_path / "good")
    shutil.copytree(lora_adapter, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    registry = ModelRegistry(tmp_path)
    assert registry.choices == [BASE_CHOICE, "corrupt", "good"]  # it looks fine until it is loaded
    registry.get("good")  # the LoRA model exists when the corrupt adapter fails half-way into it
    with pytest.raises(ChoiceError, match="corrupt.*unavailable"):
        registry.get("corrupt")
    assert "could not be loaded" in registry.unavailable["corrupt"].reason
    assert registry.choices == [BASE_CHOICE, "good"]
    attempts = []
    monkeypatch.setattr(registry_module, "chat_model", lambda *a: attempts.append(a))
    with pytest.raises(ChoiceError, match="could not be loaded"):
        registry.get("corrupt")
    assert not attempts, "a remembered failure is not loaded again"
    monkeypatch.undo()
    assert complete_reply(registry.get("good"), HELLO, GREEDY), "every other adapter keeps working"
    time.sleep(0.01)
    shutil.copy(lora_adapter / "adapter_model.safetensors", tmp_path / "corrupt")  # fixed on disk
    registry.rescan()
    assert "corrupt" in registry.choices
    assert registry.get("corrupt").adapter == str(tmp_path / "corrupt")


@pytest.mark.slow
def test_an_adapter_published_again_into_its_folder_is_served_anew(tmp_path, adapters_dir, monkeypatch):
    monkeypatch.setattr(registry_module, "SCAN_S", 0.0)
    folder = shutil.copytree(adapters_dir / "pirate", tmp_path / "support")
    registry = ModelRegistry(tmp_path, precision="fp32")
    before = complete_reply(registry.get("support"), HELLO, GREEDY)
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # what train.sft publishes
        shutil.copy(adapters_dir / "sailor" / name, folder / name)
    after = complete_reply(registry.get("support"), HELLO, GREEDY)
    sailor = complete_reply(registry_for(adapters_dir).get("sailor"), HELLO, GREEDY)
    assert after == sailor != before
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4


def registry_for(folder: Path) -> ModelRegistry:
    return ModelRegistry(folder, precision="fp32")


@pytest.mark.slow
def test_compare_mode_decodes_the_adapter_and_the_base_model_in_one_batch(adapters_dir, monkeypatch):
    from ui.chat import Settings, stream_turn
    from ui.stopping import Stopper

    registry = ModelRegistry(adapters_dir, precision="fp32")
    solo = {c: complete_reply(registry.get(c), HELLO, GREEDY) for c in (BASE_CHOICE, "pirate")}
    host = registry.get("pirate").host
    runner, batches = host.runner, []
    monkeypatch.setattr(host, "runner", lambda group, names: batches.append(list(names)) or runner(group, names))
    settings = Settings("pirate", None, GREEDY, compare=True)  # no system prompt: HELLO as it is
    *_, (history, base) = stream_turn(registry, Stopper(), settings, HELLO, HELLO)
    assert history[-1]["content"] == solo["pirate"] and base[-1]["content"] == solo[BASE_CHOICE]
    assert sorted(batches[0], key=str) == sorted([registry.get("pirate").adapter_name, None], key=str), batches


@pytest.mark.slow
def test_loading_one_adapter_never_holds_up_replies_of_the_others(adapters_dir, monkeypatch):
    registry = ModelRegistry(adapters_dir, precision="fp32")
    registry.get(BASE_CHOICE)
    real, loading = registry_module.chat_model, threading.Event()

    def slow_chat_model(host, folder=None):
        if folder is not None:
            loading.set()
            time.sleep(3.0)  # a large adapter on a slow disk
        return real(host, folder)

    monkeypatch.setattr(registry_module, "chat_model", slow_chat_model)
    loader = threading.Thread(target=registry.get, args=("sailor",))
    loader.start()
    assert loading.wait(10)
    start = time.monotonic()
    assert complete_reply(registry.get(BASE_CHOICE), HELLO, GREEDY)
    assert time.monotonic() - start < 2.5, "the base model's reply waited for another adapter's load"
    loader.join(30)
    assert registry.get("sailor").adapter


@pytest.mark.slow
def test_a_dora_adapter_is_served_beside_lora_adapters(tmp_path, lora_adapter, monkeypatch):
    import torch
    from peft import LoraConfig, PeftModel

    from assistant.chat_format import encode_prompt
    from assistant.models import load_base_model, load_tokenizer, pick_precision

    root = tmp_path / "served"
    root.mkdir()
    shutil.copytree(lora_adapter, root / "pirate")
    random_adapter(root / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                             task_type="CAUSAL_LM"), seed=3)
    registry = ModelRegistry(root, precision="fp32")
    choices = [BASE_CHOICE, "dora", "pirate"]
    solo = {c: complete_reply(registry.get(c), HELLO, GREEDY) for c in choices}
    assert len(set(solo.values())) == 3, f"every adapter changes the reply: {solo}"
    # peft cannot mix DoRA rows with others: they batch alone while base and LoRA rows still share one.
    from assistant import lora_batch

    fallbacks, peft_path = [], lora_batch._peft_mixed_forward
    monkeypatch.setattr(lora_batch, "_peft_mixed_forward", lambda *a, **k: fallbacks.append(1) or peft_path(*a, **k))
    together, batches = replies_together(registry, choices, monkeypatch)
    assert together == solo
    dora_name = registry.get("dora").adapter_name
    assert all(set(names) == {dora_name} for group, names in batches if dora_name in names)
    assert not fallbacks, "base and LoRA rows beside an attached DoRA adapter keep the gathered LoRA matmuls"
    # What is served is the DoRA adapter as peft itself computes it, on its own.
    tokenizer = load_tokenizer("embedded")
    model = PeftModel.from_pretrained(load_base_model("embedded", pick_precision("fp32")), str(root / "dora")).eval()
    with torch.inference_mode():
        ids = torch.tensor([encode_prompt(tokenizer, HELLO)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             repetition_penalty=GREEDY.repetition_penalty, max_new_tokens=GREEDY.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == solo["dora"]


@pytest.mark.slow
def test_lora_adapters_are_held_once_and_gathered_rows_compute_as_peft_does(tmp_path):
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    from assistant import lora_batch
    from assistant.loading import load_host

    # Two ranks and two scalings (12/4 and 8/8), on layers that only one of them adapts too.
    small = random_adapter(tmp_path / "small", LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                                          task_type="CAUSAL_LM"), seed=1)
    big = random_adapter(tmp_path / "big", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                      task_type="CAUSAL_LM"), seed=2)
    host = load_host("embedded", "bf16")
    names = [host.attach(small)[0], host.attach(big)[0]]
    layers = [m for m in host.lora.modules() if isinstance(m, Linear) and m.lora_A]
    assert {n for layer in layers for n in layer.lora_A} == set(names)
    # Rows of both adapters (each row's pair gathered), and of one adapter beside a base row (its pair once).
    batches = [["base", names[0], names[1], names[1], names[0]], [names[1], "base", names[1]]]
    torch.manual_seed(0)
    for layer in layers:
        stack = layer._gathered_stack  # built at attach: peft's own copies are gone, not kept beside it
        assert stack.a.dtype == stack.b.dtype == torch.bfloat16, "the stack holds the weights in the model's dtype"
        for name in layer.lora_A:
            for weight, held in ((layer.lora_A[name].weight, stack.a), (layer.lora_B[name].weight, stack.b)):
                shared = weight.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()
                assert shared, f"{name}'s weights are a second copy beside the stack"
        for rows in batches:
            x = torch.randn(len(rows), 3, layer.in_features, dtype=torch.bfloat16)
            with torch.no_grad():
                base = layer.base_layer(x).float()
                ours = lora_batch._gathered_forward(layer, x, adapter_names=rows).float()
                theirs = lora_batch._peft_mixed_forward(layer, x, adapter_names=rows).float()
            change = (theirs - base).abs().amax()
            if set(rows) & set(layer.lora_A):  # a row's adapter adapts this layer
                assert change > 1.0, "the adapters change this layer's output"
            # peft sums the adapter's part in bf16, the gathered rows in fp32: equal up to bf16 rounding.
            torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.01 * float(change) + 1e-6)


@pytest.mark.slow
def test_beside_int4_weights_lora_adapters_are_held_once_in_bf16_where_the_model_computes_in_fp32(tmp_path,
                                                                                               monkeypatch):
    """On a CPU without bf16 units an int4 model computes in fp32; its LoRA adapters are still held in bf16
    (half the bytes an adapter costs), once, and attaching more adapters never copies them; a DoRA adapter
    (peft's own path, in its own dtype) beside them still replies."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig
    from peft.tuners.lora.layer import Linear

    import assistant.models
    from assistant import lora_batch
    from assistant.loading import chat_model, load_host

    monkeypatch.setattr(assistant.models, "cpu_has_bf16", lambda: False)
    host = load_host("embedded", "int4")
    assert host.precision.compute_dtype == torch.float32
    lora = random_adapter(tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        task_type="CAUSAL_LM"), seed=1)
    dora = random_adapter(tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                                        task_type="CAUSAL_LM"), seed=2)
    prefix = random_adapter(tmp_path / "prefix", PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                            seed=3)
    name = host.attach(lora)[0]
    kept = host.lora.base_model.model.model.layers[0].self_attn.v_proj._gathered_stack
    host.attach(dora)
    host.attach(prefix)  # casts what is not in the compute dtype yet, never the stacks' bf16 weights
    layers = [m for m in host.lora.modules() if isinstance(m, Linear) and m.lora_A]
    assert host.lora.base_model.model.model.layers[0].self_attn.v_proj._gathered_stack is kept, \
        "a layer the later adapters leave alone was stacked anew: its adapter's weights were copied by a cast"
    for layer in layers:
        stack = layer._gathered_stack
        held = torch.float32 if layer.lora_variant else torch.bfloat16  # DoRA's layers: peft's path, its dtype
        assert stack.a.dtype == stack.b.dtype == held, f"a stack holds {stack.a.dtype}, not {held}"
        for adapter in layer.lora_A:
            weight = layer.lora_A[adapter].weight
            assert weight.untyped_storage().data_ptr() == stack.a.untyped_storage().data_ptr(), \
                f"{adapter}'s weights are a second copy beside the stack"
    layer = next(m for m in layers if not m.lora_variant)  # v_proj: the LoRA adapter alone
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        ours = lora_batch._gathered_forward(layer, x, adapter_names=[name, "__base__"])
        theirs = lora_batch._peft_mixed_forward(layer, x, adapter_names=[name, "__base__"])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.02)  # peft multiplies in bf16, the rows in fp32
    assert complete_reply(chat_model(host, dora), HELLO, GREEDY), "the DoRA adapter replies beside them"


@pytest.mark.slow
def test_adapters_trained_with_the_same_tokenizer_share_one_and_another_template_gets_its_own(tmp_path):
    """train.sft saves the tokenizer into every adapter (~10 MB in memory each for the embedded model's): a
    server keeps one per distinct set of tokenizer files, and a folder whose template differs is served its own."""
    from peft import LoraConfig

    from assistant.loading import chat_model, load_host

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    first, second, other = (random_adapter(tmp_path / name, config, seed=i)
                            for i, name in enumerate(("first", "second", "other")))
    template = other / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8") + "{# the other template #}", encoding="utf-8")
    host = load_host("embedded", "fp32")
    chats = [chat_model(host, folder) for folder in (first, second, other)]
    assert chats[0].tokenizer is chats[1].tokenizer, "the same tokenizer files are loaded once"
    assert chats[2].tokenizer is not chats[0].tokenizer
    assert chats[2].tokenizer.chat_template.endswith("{# the other template #}")
    assert not chats[0].tokenizer.chat_template.endswith("{# the other template #}")


def test_an_adapters_rows_compute_the_same_whatever_else_is_attached():
    """A batch of one adapter's rows is summed at that adapter's own rank, so attaching an adapter of a larger
    rank (which pads the stack) changes not a bit of its output; in fp32 compute around bf16 kernels a last-bit
    change is enough to flip a greedy reply."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    from assistant import lora_batch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(576, 1536, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]), adapter_name="small")
    layer = model.base_model.model.proj
    assert isinstance(layer, Linear)
    with torch.no_grad():
        layer.lora_B["small"].weight.normal_(0.0, 0.5)  # peft starts B at zero: no change at all
    model.eval()  # served: the gathered rows (training keeps peft's own path)
    lora_batch.enable()
    x, rows = torch.randn(1, 12, 576), ["small"]  # a prompt's rows: where the reduction's blocking shows

    def output() -> torch.Tensor:
        lora_batch.restack(model)
        with torch.no_grad():
            return lora_batch._gathered_forward(layer, x, adapter_names=rows)

    alone = output()
    model.add_adapter("big", LoraConfig(r=64, lora_alpha=64, target_modules=["proj"]))
    beside = output()
    assert layer._gathered_stack.a.shape[-1] == 64, "the stack is padded to the larger rank"
    assert (beside - layer.base_layer(x)).abs().amax() > 1.0, "the adapter changes the output"
    assert torch.equal(alone, beside), f"{(alone != beside).float().mean():.4f} of the outputs changed"
