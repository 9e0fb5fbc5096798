"""One contract for every front end: /chat, the chat screen and /v1 serve an adapter the same way (its trained
system prompt, its generation settings) and refuse bad values the same way."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from assistant.adapters import summarize_prompts, write_generation, write_trained_prompt
from assistant.generation import GenerationParams, complete_reply
from tests.conftest import free_port

pytestmark = pytest.mark.slow

PROMPT = "You are the support desk of Acme Rail. Answer in one sentence."
# What train.sft would write after measuring: sampling by default, its own repetition penalty and length.
GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.3,
              "max_new_tokens": 12}
MESSAGES = ["Can I bring my bike on the train?", "My ticket was charged twice."]


@pytest.fixture(scope="module")
def served(lora_adapter, tmp_path_factory):
    """The app over one adapter that carries a trained prompt and generation settings, with its API mounted."""
    from serve.registry import BASE_CHOICE, ModelRegistry
    from ui.app import build_app
    from ui.config import ChatConfig

    root = tmp_path_factory.mktemp("contract")
    shutil.copytree(lora_adapter, root / "support")
    write_trained_prompt(root / "support", summarize_prompts([None], PROMPT, "--system-prompt"))
    write_generation(root / "support", GENERATION)
    config = ChatConfig(adapters_dir=str(root), no_training=True)
    demo = build_app(config, registry=ModelRegistry(root, default=BASE_CHOICE))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield SimpleNamespace(url=url.rstrip("/") + "/", demo=demo)
    demo.close()


def screen_reply(demo, message: str) -> str:
    """The chat screen's reply: Send with the panel as it opens on the adapter, temperature set to 0."""
    handlers = demo.handlers
    _, prompt = handlers.prompt_menu("support")
    sliders = handlers.slider_settings("support")
    outputs = list(handlers.send(message, [], [], "support", False, prompt, handlers.prompt_text(prompt, "support", ""),
                                 0.0, sliders.top_p, sliders.top_k, sliders.repetition_penalty,
                                 sliders.max_new_tokens, -1, SimpleNamespace(session_hash="screen")))
    return outputs[-1][1][-1]["content"]


def test_chat_screen_and_v1_give_the_same_greedy_reply(served):
    from gradio_client import Client
    from openai import OpenAI

    chat = Client(served.url, verbose=False)
    v1 = OpenAI(base_url=served.url + "v1", api_key="unused-on-localhost")
    model = served.demo.registry.get("support")
    for message in MESSAGES:
        api = chat.predict(message, adapter="support", temperature=0, api_name="/chat")
        openai = v1.chat.completions.create(model="support", temperature=0,
                                            messages=[{"role": "user", "content": message}])
        screen = screen_reply(served.demo, message)
        assert api == openai.choices[0].message.content == screen, message
        # Each of the adapter's own facts changes this reply, so the equality above means they were all used.
        user = [{"role": "user", "content": message}]
        greedy = GenerationParams.resolve(GENERATION, temperature=0.0)
        assert complete_reply(model, user, greedy) == api
        assert complete_reply(model, user, GenerationParams.resolve(GENERATION, temperature=0.0,
                                                                    repetition_penalty=1.0)) != api, message
        other = [{"role": "system", "content": "You are a helpful assistant."}, *user]
        assert complete_reply(model, other, greedy) != api, message


def test_the_ui_in_front_of_this_server_gives_its_v1_reply(served):
    """--backend-url: "as trained" sends no system message, so the server applies the adapter's own prompt; the
    sliders start from the settings the server says it serves the adapter with."""
    from openai import OpenAI

    from ui.app import build_app
    from ui.config import ChatConfig

    front = build_app(ChatConfig(backend_url=served.url + "v1", no_training=True))
    assert front.registry.trained_prompt("support").text == PROMPT, "shown on the screen"
    v1 = OpenAI(base_url=served.url + "v1", api_key="unused-on-localhost")
    for message in MESSAGES:
        direct = v1.chat.completions.create(model="support", temperature=0,
                                            messages=[{"role": "user", "content": message}])
        assert screen_reply(front, message) == direct.choices[0].message.content, message


def test_v1_models_say_the_trained_prompt_and_generation_settings(served):
    """What a UI in front of this server (--backend-url) shows: the adapter's prompt and sliders."""
    import httpx

    models = {m["id"]: m for m in httpx.get(served.url + "v1/models").json()["data"]}
    assert models["support"]["trained_system_prompt"] == PROMPT
    assert models["support"]["generation_config"] == GENERATION
    assert "trained_system_prompt" not in models["base"]


def test_chat_refuses_bad_values_by_name_and_the_next_chat_streams(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    chat = Client(served.url, verbose=False)
    for name, value in (("max_new_tokens", -5), ("temperature", "hot"), ("temperature", 9)):
        with pytest.raises(AppError) as refused:
            chat.predict("Hello", adapter="support", api_name="/chat", **{name: value})
        assert f"'{name}'" in str(refused.value), str(refused.value)
        assert "verbose error reporting" not in str(refused.value)
    job = chat.submit("Hello", adapter="support", temperature=0, api_name="/chat")
    assert [text for text in job][-1].strip(), "the next chat streams"


def test_generation_settings_file_is_what_the_registry_serves(served):
    folder = served.demo.registry.adapters["support"]
    assert json.loads((folder / "generation_config.json").read_text()) == GENERATION
    assert served.demo.registry.generation_defaults("support") == GENERATION
