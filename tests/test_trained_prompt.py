"""The system prompt an adapter was trained with travels with it: every serving path renders the same ids."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from assistant.adapters import (
    PROMPT_FILE,
    messages_for,
    summarize_prompts,
    trained_prompt,
    write_trained_prompt,
)
from assistant.batching import END
from assistant.chat_format import IGNORE_INDEX, render_chat, template_default_system
from assistant.models import load_tokenizer
from serve.registry import BASE_CHOICE, ModelRegistry
from train.pipeline import prepare_data
from train.sft import SFTConfig
from ui.handlers import Handlers
from ui.prompts import AS_TRAINED, DEFAULT_PROMPT, list_prompts
from ui.stopping import StopSignals

ROW = {"prompt": "Hi, I need to change my booking for tomorrow.", "response": "Sure, what is your booking ID?"}
PIRATE = "Answer as a pirate would."


def test_the_template_default_system_prompt_is_found_exactly():
    tokenizer = load_tokenizer("embedded")
    text = template_default_system(tokenizer)
    assert text == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    chat = [{"role": "user", "content": "hello"}]
    assert render_chat(tokenizer, [{"role": "system", "content": text}, *chat]) == render_chat(tokenizer, chat)
    # A template that writes no system message of its own has no default to record.
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    assert template_default_system(tokenizer) is None


def test_the_recorded_prompt_is_the_one_most_rows_were_trained_with():
    default = summarize_prompts([None, None], "D", "template default")
    assert (default.text, default.source, default.rows_with_own, default.distinct) == ("D", "template default", 0, 1)
    own = summarize_prompts(["S", "S"], "D", "template default")
    assert (own.text, own.source, own.rows_with_own) == ("S", "rows", 2)
    mixed = summarize_prompts(["S", None, None], "X", "--system-prompt")
    assert (mixed.text, mixed.source, mixed.distinct) == ("X", "--system-prompt", 2)
    none = summarize_prompts([None], None, "template default")
    assert (none.text, none.source) == (None, "none")
    assert messages_for([{"role": "user", "content": "q"}], none.text) == [{"role": "user", "content": "q"}]


class Recorder:
    """Stands in for the batch engine: records the prompt ids each serving path submits."""

    def __init__(self):
        self.ids: list[list[int]] = []

    def submit(self, request):
        self.ids.append(list(request.ids))
        request.tokens.put(END)
        return request


def trained_ids(tmp_path, system: str | None) -> tuple[list[int], object]:
    """Prompt ids of ROW as train.sft renders it for training, and the prompt it records."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    prepared = prepare_data(SFTConfig(data=str(data), valid_fraction=0.0, system_prompt=system))
    item = prepared.train.items[0]
    first_label = next(i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX)
    return item["input_ids"][:first_label], prepared.prompt


def served_ids(registry: ModelRegistry, choice: str, monkeypatch) -> dict[str, list[int]]:
    """Prompt ids that the UI handler, /chat and /v1/chat/completions submit for ROW's prompt."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve.openai_api import OpenAIServer

    recorder = Recorder()
    monkeypatch.setattr("assistant.generation.engine_for", lambda chat: recorder)
    handlers = Handlers(registry, StopSignals(), lambda fn: fn)
    request = SimpleNamespace(session_hash="test")
    # The UI: the system prompt box as the app fills it when this adapter is chosen.
    menu, system = handlers.use_trained_prompt(choice, DEFAULT_PROMPT, list_prompts()[DEFAULT_PROMPT])
    for _ in handlers.send(ROW["prompt"], [], [], choice, False, menu["value"], system, 0.0, 1.0, 0, 1.0, 16, -1,
                           request):
        pass
    for _ in handlers.api_chat(ROW["prompt"], adapter=choice, request=request):  # /chat, no system prompt
        pass
    app = FastAPI()
    app.include_router(OpenAIServer(registry).router)  # keyless: answers a caller on loopback
    body = {"model": choice, "messages": [{"role": "user", "content": ROW["prompt"]}], "max_tokens": 16}
    assert TestClient(app, client=("127.0.0.1", 50000)).post("/v1/chat/completions", json=body).status_code == 200
    assert len(recorder.ids) == 3
    return dict(zip(["ui", "/chat", "/v1/chat/completions"], recorder.ids, strict=True))


@pytest.mark.parametrize("system", [None, PIRATE, "@file"], ids=["template-default", "text", "file"])
def test_every_serving_path_renders_the_trained_conversation(tmp_path, lora_adapter, monkeypatch, system):
    if system == "@file":
        (tmp_path / "prompt.txt").write_text(PIRATE + "\n")
        system = f"@{tmp_path / 'prompt.txt'}"
    expected, prompt = trained_ids(tmp_path, system)
    assert prompt.text == (PIRATE if system else template_default_system(load_tokenizer("embedded")))
    adapter = tmp_path / "adapters" / "support"
    shutil.copytree(lora_adapter, adapter)
    write_trained_prompt(adapter, prompt)  # what train.sft writes into the folder it publishes
    assert trained_prompt(adapter) == prompt
    registry = ModelRegistry(extra=[adapter])
    for path, ids in served_ids(registry, "support", monkeypatch).items():
        assert ids == expected, f"{path} serves other tokens than the adapter was trained on"
    # Serving the app's general prompt instead (what the app did before) renders something else.
    general = registry.get("support").tokenizer
    other = [{"role": "system", "content": list_prompts()[DEFAULT_PROMPT]}, {"role": "user", "content": ROW["prompt"]}]
    assert general(render_chat(general, other, add_generation_prompt=True))["input_ids"] != expected


def test_the_prompt_menu_preselects_the_trained_prompt_and_notes_another(tmp_path, lora_adapter):
    adapter = tmp_path / "support"
    shutil.copytree(lora_adapter, adapter)
    write_trained_prompt(adapter, summarize_prompts([None], PIRATE, "--system-prompt"))
    untracked = tmp_path / "older"  # an adapter from before prompts were recorded
    shutil.copytree(lora_adapter, untracked)
    assert not (untracked / PROMPT_FILE).exists()
    handlers = Handlers(ModelRegistry(extra=[adapter, untracked]), StopSignals(), lambda fn: fn)
    general = list_prompts()[DEFAULT_PROMPT]

    menu, text = handlers.use_trained_prompt("support", DEFAULT_PROMPT, general)
    assert menu["value"] == AS_TRAINED and menu["choices"][0] == AS_TRAINED and text == PIRATE
    assert handlers.prompt_note("support", PIRATE)["visible"] is False
    note = handlers.prompt_note("support", general)
    assert note["visible"] is True and "trained with a different system prompt" in note["value"]
    assert handlers.prompt_text(AS_TRAINED, "support", "") == PIRATE

    # Without a record (or on the base model) the menu keeps the prompt in use and shows no note.
    for choice in ("older", BASE_CHOICE):
        menu, text = handlers.use_trained_prompt(choice, AS_TRAINED, PIRATE)
        assert AS_TRAINED not in menu["choices"] and menu["value"] == DEFAULT_PROMPT and text == general
        assert handlers.prompt_note(choice, "anything")["visible"] is False
    assert handlers.default_system("support") == PIRATE and handlers.default_system("older") == general


def test_a_broken_prompt_record_is_ignored_not_fatal(tmp_path):
    (tmp_path / PROMPT_FILE).write_text("{not json")
    assert trained_prompt(tmp_path) is None
