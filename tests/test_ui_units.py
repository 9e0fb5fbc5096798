"""Small pieces of the chat app: prompts, history cuts, settings, auth, stop signals."""

from __future__ import annotations

import threading

import pytest

from serve.registry import BASE_CHOICE
from ui.chat import Settings
from ui.config import ChatConfig
from ui.history import cut_for_edit, cut_for_retry, cut_for_undo, last_user_index, model_messages, plain
from ui.prompts import AS_TRAINED, list_prompts
from ui.stopping import StopSignals

CHAT = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine"},
]


def test_prompts_folder_has_the_required_prompts(tmp_path):
    prompts = list_prompts()
    assert {"general", "customer_support"} <= set(prompts)
    assert "never invent" in prompts["customer_support"].lower()
    (tmp_path / "b.txt").write_text(" second \n")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("  ")
    (tmp_path / "notes.md").write_text("not a prompt")
    assert list_prompts(tmp_path) == {"a": "first", "b": "second"}


def test_plain_flattens_gradio_message_parts():
    gradio_value = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "file", "file": {"path": "x.png"}}]},
    ]
    assert plain(gradio_value) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]
    assert plain(None) == [] and plain(CHAT) == CHAT


def test_model_messages_put_the_system_prompt_first():
    assert model_messages(None, CHAT) == CHAT, "None: no system message (the served model's trained one applies)"
    messages = model_messages("Be brief.", [{"role": "system", "content": "old"}, *CHAT])
    assert messages[0] == {"role": "system", "content": "Be brief."} and messages[1:] == CHAT
    assert model_messages("Be brief.\n", CHAT)[0]["content"] == "Be brief.\n", "exactly as trained"


def test_retry_undo_edit_cuts():
    assert last_user_index(CHAT) == 2 and last_user_index([]) is None
    assert cut_for_retry(CHAT, 2) == CHAT[:3]
    assert cut_for_undo(CHAT, 2) == CHAT[:2]
    assert cut_for_edit(CHAT, 0, "hey") == [{"role": "user", "content": "hey"}]


def test_settings_from_the_panel():
    settings = Settings.of("pirate", True, "custom", "sys", 0.0, 0.9, 40, 1.1, 64.0, -1)
    assert settings.compare and settings.params.seed is None and settings.params.max_new_tokens == 64
    assert settings.params.generate_kwargs()["do_sample"] is False
    assert settings.system == "sys"
    assert Settings.of(BASE_CHOICE, True, "general", "", 0.7, 0.9, 40, 1.1, 64, 7).compare is False
    assert Settings.of(BASE_CHOICE, False, "general", "", 0.7, 0.9, 40, 1.1, 64, 7).params.seed == 7


def test_as_trained_sends_no_system_message():
    """"as trained" (or an empty box) sends no system message, so the one prompt rule applies the trained prompt
    wherever the model is served (in process, or behind --backend-url, where this app cannot add it)."""
    assert Settings.of("pirate", False, AS_TRAINED, "Arr, the trained prompt.", 0, 1, 0, 1, 8, -1).system is None
    assert Settings.of("pirate", False, "custom", "  ", 0, 1, 0, 1, 8, -1).system is None
    assert Settings.of("pirate", False, "general", "You are helpful.", 0, 1, 0, 1, 8, -1).system == "You are helpful."


SECRET_ENV = ("ASSISTANT_AUTH", "ASSISTANT_API_KEY", "ASSISTANT_BACKEND_KEY")


@pytest.fixture
def no_secret_env(monkeypatch):
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_login_comes_from_a_file_or_the_environment(no_secret_env, tmp_path):
    assert ChatConfig().credentials() is None
    auth = tmp_path / "auth"
    auth.write_text("ann:s3cret:x\n")
    assert ChatConfig(auth_file=str(auth)).credentials() == [("ann", "s3cret:x")]
    no_secret_env.setenv("ASSISTANT_AUTH", "bob:pw")
    assert ChatConfig().credentials() == [("bob", "pw")]
    assert ChatConfig(auth_file=str(auth)).credentials() == [("ann", "s3cret:x")], "the file named wins"
    auth.write_text("ann:s3cret:x\n\nbob:pw2\n")
    assert ChatConfig(auth_file=str(auth)).credentials() == [("ann", "s3cret:x"), ("bob", "pw2")], "one per line"
    for text, line in (("nopassword-s3cret", 1), ("ann:pw\nbob-s3cret", 2), ("ann:pw\nann:s3cret", 2)):
        auth.write_text(text)
        with pytest.raises(ValueError, match=f"line {line}") as malformed:
            ChatConfig(auth_file=str(auth)).credentials()
        assert "s3cret" not in str(malformed.value), "a malformed secret is not echoed"


@pytest.mark.parametrize(
    ("field", "flag", "env", "read"),
    [
        ("api_key_file", "--api-key-file", "ASSISTANT_API_KEY", ChatConfig.openai_key),
        ("backend_key_file", "--backend-key-file", "ASSISTANT_BACKEND_KEY", ChatConfig.backend_key),
    ],
)
def test_keys_come_from_a_file_or_the_environment(no_secret_env, tmp_path, field, flag, env, read):
    assert read(ChatConfig()) is None
    no_secret_env.setenv(env, "sk-from-env")
    assert read(ChatConfig()) == "sk-from-env"
    key = tmp_path / "key"
    key.write_text("  sk-from-file\n")
    assert read(ChatConfig(**{field: str(key)})) == "sk-from-file"
    key.write_text("\n")
    with pytest.raises(ValueError, match=f"{flag} {key} is empty"):
        read(ChatConfig(**{field: str(key)}))
    with pytest.raises(ValueError, match=f"{flag} {tmp_path / 'missing'}: cannot read"):
        read(ChatConfig(**{field: str(tmp_path / "missing")}))


def test_the_access_policy_holds_the_key_but_never_shows_it(no_secret_env, tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-never-shown")
    policy = ChatConfig(api_key_file=str(key), host="0.0.0.0", share=True).access_policy()
    assert policy.api_key == "sk-never-shown" and policy.bind_host == "0.0.0.0" and policy.share
    assert "sk-never-shown" not in repr(policy)
    no_secret_env.setenv("ASSISTANT_AUTH", "ann:pw")
    assert ChatConfig().access_policy().login


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--api-key", "sk-typed"], "use $ASSISTANT_API_KEY or --api-key-file"),
        (["--auth=ann:sk-typed"], "use $ASSISTANT_AUTH or --auth-file"),
        (["--backend-key", "sk-typed"], "use $ASSISTANT_BACKEND_KEY or --backend-key-file"),
        (["--api-key-f", "sk-typed"], "unrecognized arguments: --api-key-f"),  # no abbreviation of --api-key-file
        (["--api-kee", "sk-typed"], "unrecognized arguments: --api-kee"),
    ],
)
def test_a_secret_on_the_command_line_is_refused_without_echoing_it(capsys, argv, says):
    from ui.__main__ import parse_config

    with pytest.raises(SystemExit) as exited:
        parse_config(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and says in err and "sk-typed" not in err


def test_stop_signals_reach_only_their_session():
    signals = StopSignals()
    with signals.request("alice") as alice, signals.request("bob") as bob:
        first = alice.next_event()
        assert signals.stop("alice") == 1
        assert first.is_set() and alice.next_event().is_set(), "a stopped request starts nothing new"
        assert not bob.next_event().is_set()
    assert signals.stop("alice") == 0, "finished requests are forgotten"


def test_stopper_hands_out_fresh_events_until_stopped():
    signals = StopSignals()
    with signals.request(None) as stopper:
        first = stopper.next_event()
        first.set()  # stream_reply sets its event when a reply ends normally
        assert not stopper.next_event().is_set()
        done = threading.Event()
        threading.Thread(target=lambda: (signals.stop(None), done.set())).start()
        assert done.wait(5) and stopper.stopped.is_set()


def test_stop_ends_both_replies_of_compare_mode():
    signals = StopSignals()
    with signals.request("browser") as stopper:
        adapter_side, base_side = stopper.next_event(), stopper.next_event()  # streamed at the same time
        signals.stop("browser")
        assert adapter_side.is_set() and base_side.is_set()


def test_a_new_model_choice_moves_the_sampling_sliders_and_keeps_the_users_length():
    """The sliders follow what each model is served with; the reply length stays the user's unless a model
    sets its own."""
    from types import SimpleNamespace

    import gradio as gr

    from ui.handlers import Handlers

    own = {"base model": {}, "tuned": {"repetition_penalty": 1.05, "do_sample": False},
           "short": {"max_new_tokens": 32}}
    registry = SimpleNamespace(generation_defaults=lambda choice: own[choice])
    handlers = Handlers(registry, StopSignals(), lambda fn: fn)
    temperature, _, _, penalty, length = handlers.generation_sliders("tuned")
    assert (temperature, penalty) == (0.0, 1.05)
    assert length == gr.skip(), "the length slider is left where the user put it"
    assert handlers.generation_sliders("base model")[3] != 1.05
    assert handlers.generation_sliders("short")[4] == 32
