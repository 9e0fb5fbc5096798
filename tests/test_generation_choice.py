"""The trainer chooses the generation settings an adapter is served with (train.sampling), writes them into
the adapter folder (train.sft --generation-rows) and a merged folder carries them (train.merge)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from assistant.adapters import (
    GENERATION_FILE,
    AdapterFolder,
    TrainedPrompt,
    messages_for,
    read_folder,
    write_generation,
)
from assistant.batching import END
from assistant.chat_format import encode_prompt
from assistant.generation import GenerationParams
from assistant.loading import ChatModel
from assistant.models import load_tokenizer
from train.events import EventLog
from train.pipeline import pick_generation
from train.records import Example
from train.sampling import candidates, choose_generation
from train.sft import SFTConfig

PIRATE = "Answer as a pirate would."
ROWS = [
    Example([{"role": "user", "content": "Where is my parcel?"},
             {"role": "assistant", "content": "Your parcel left the depot this morning."}], "a:1", "pairs"),
    Example([{"role": "user", "content": "Can I change my seat?"},
             {"role": "assistant", "content": "Yes, seats can be changed until check-in."}], "a:2", "pairs"),
    Example([{"role": "user", "content": "Is the shop open on Sunday?"},
             {"role": "assistant", "content": "The shop opens at ten on Sundays."}], "a:3", "pairs"),
]


def _sampled(params: GenerationParams) -> tuple:
    """What a generate call of `params` does: the settings that reach the sampler."""
    return (params.temperature, params.top_p, params.top_k, params.repetition_penalty) if params.temperature > 0 \
        else (0.0, params.repetition_penalty)


def fake_replies(winner):
    """A serving path whose replies equal the references only for the settings `winner(params)` accepts."""
    seen: list[tuple] = []

    def reply(chat, contexts, params):
        seen.append(_sampled(params))
        references = {row.messages[0]["content"]: row.messages[-1]["content"] for row in ROWS}
        return [references[c[-1]["content"]] if winner(params) else "no idea" for c in contexts]

    return reply, seen


@pytest.mark.parametrize(
    ("winner", "expected"),
    [
        (lambda p: p.temperature > 0 and p.repetition_penalty == 1.05,
         {"do_sample": True, "temperature": GenerationParams().temperature, "top_p": GenerationParams().top_p,
          "top_k": GenerationParams().top_k, "repetition_penalty": 1.05}),
        (lambda p: p.temperature == 0 and p.repetition_penalty == 1.1, {"do_sample": False, "repetition_penalty": 1.1}),
    ],
    ids=["sampling", "greedy"],
)
def test_the_best_scored_candidate_is_chosen_and_served_as_measured(winner, expected):
    reply, seen = fake_replies(winner)
    choice = choose_generation(None, ROWS, reply=reply)
    assert choice["settings"] == expected
    assert choice["rows"] == 3 and len(choice["candidates"]) == 6 == len(seen)
    best = [c for c in choice["candidates"] if c["rouge_l"] == 1.0]
    assert [c["settings"] for c in best] == [expected], "only the winner matched the references"
    assert all(c["rouge_l"] < 0.2 for c in choice["candidates"] if c["settings"] != expected)
    # What the server applies to a request that leaves the settings unset is what was measured.
    winning_call = seen[choice["candidates"].index(best[0])]
    assert _sampled(GenerationParams.resolve(choice["settings"])) == winning_call
    assert json.dumps(choice)  # the training report holds it as it is


def test_the_default_temperature_is_the_apps_and_ties_go_to_greedy():
    assert {c.get("temperature") for c in candidates()} == {None, GenerationParams().temperature}
    assert [c["repetition_penalty"] for c in candidates()] == [1.0, 1.05, 1.1] * 2
    assert all(not c["do_sample"] for c in candidates(temperature=0.0)), "temperature 0 is greedy"
    choice = choose_generation(None, ROWS, reply=lambda chat, contexts, params: ["same"] * len(contexts),
                               score=lambda reference, reply: 0.5)
    assert choice["settings"] == {"do_sample": False, "repetition_penalty": 1.0}


def test_rows_are_capped_and_rows_without_a_reference_skipped():
    asked: list[int] = []

    def reply(chat, contexts, params):
        asked.append(len(contexts))
        return [""] * len(contexts)

    no_reply = Example([{"role": "user", "content": "Hello?"}], "b:1", "chat")
    assert choose_generation(None, [no_reply, *ROWS], max_rows=2, reply=reply)["rows"] == 2
    assert set(asked) == {2}
    with pytest.raises(ValueError, match="no row with an assistant reply"):
        choose_generation(None, [no_reply], reply=reply)


class Recorder:
    """Stands in for the batch engine: records what each request asks for and ends its reply at once."""

    def __init__(self):
        self.requests = []

    def submit(self, request):
        self.requests.append(request)
        request.tokens.put(END)
        return request


def test_candidates_answer_through_the_serving_path_with_the_trained_prompt(monkeypatch):
    from transformers import GenerationConfig

    recorder = Recorder()
    monkeypatch.setattr("assistant.generation.engine_for", lambda host: recorder)
    tokenizer = load_tokenizer("embedded")
    folder = AdapterFolder(Path("support"), "lora", "embedded", prompt=TrainedPrompt(PIRATE, "--system-prompt"))
    host = SimpleNamespace(base=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048)),
                           solo=set(), lock=threading.Lock())
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=tokenizer.eos_token_id))
    chat = ChatModel(model, tokenizer, "embedded", None, "support", "lora", folder, host, "support")
    choose_generation(chat, ROWS, max_rows=2, max_new_tokens=7)
    assert len(recorder.requests) == 12, "6 candidates x 2 rows"
    expected = [encode_prompt(tokenizer, messages_for(row.messages[:1], PIRATE)) for row in ROWS[:2]]
    assert sorted(r.ids for r in recorder.requests) == sorted(expected * 6)
    assert {r.params.max_new_tokens for r in recorder.requests} == {7}
    assert {(r.params.temperature, r.params.repetition_penalty) for r in recorder.requests} == {
        (t, p) for t in (0.0, GenerationParams().temperature) for p in (1.0, 1.05, 1.1)}


def test_writing_into_a_models_own_generation_config_keeps_its_token_ids(tmp_path):
    (tmp_path / GENERATION_FILE).write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": [2, 7], "temperature": 0.2, "top_p": 0.5}))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    write_generation(tmp_path, {"do_sample": False, "repetition_penalty": 1.05})
    written = json.loads((tmp_path / GENERATION_FILE).read_text())
    assert written == {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": False, "repetition_penalty": 1.05}
    assert read_folder(tmp_path).generation == {"do_sample": False, "repetition_penalty": 1.05}


def test_a_failed_choice_never_costs_the_adapter(tmp_path, caplog):
    config = SFTConfig(generation_rows=4, probe_tokens=8)
    # No row to measure on: the choice fails; the run goes on without the file and says why.
    entry = pick_generation(config, None, [], tmp_path, EventLog(None))
    assert "no row with an assistant reply" in entry["error"]
    assert not (tmp_path / GENERATION_FILE).exists()
    assert "generation settings not chosen" in caplog.text
    assert pick_generation(SFTConfig(generation_rows=0), None, ROWS, tmp_path, EventLog(None)) is None


# -- real runs (the session's trained adapters) --------------------------------------------------------------
@pytest.mark.slow
def test_train_sft_writes_the_chosen_settings_and_reports_every_candidate(trained_lora):
    report = json.loads((trained_lora / "training_report.json").read_text())
    entry = report["generation"]
    assert entry["rows"] == 2 and len(entry["candidates"]) == 6
    assert all(0 <= c["rouge_l"] <= 1 for c in entry["candidates"])
    assert entry["settings"] in [c["settings"] for c in entry["candidates"]]
    best = max(c["rouge_l"] for c in entry["candidates"])
    assert next(c for c in entry["candidates"] if c["settings"] == entry["settings"])["rouge_l"] == best
    assert read_folder(trained_lora).generation == entry["settings"], "the folder serves what was chosen"


@pytest.mark.slow
def test_generation_rows_0_writes_no_settings(trained_prefix):
    assert not (trained_prefix / GENERATION_FILE).exists()
    assert "generation" not in json.loads((trained_prefix / "training_report.json").read_text())
    assert read_folder(trained_prefix).generation == {}


@pytest.mark.slow
def test_a_merged_folder_serves_with_the_adapters_generation_settings_and_prompt(trained_lora, tmp_path):
    from assistant.loading import base_generation_file, chat_model, load_host
    from train.merge import MergeConfig, merge

    out = merge(MergeConfig(adapter=str(trained_lora), output_dir=str(tmp_path / "merged")))
    merged, adapter = read_folder(out), read_folder(trained_lora)
    assert adapter.generation and merged.generation == adapter.generation
    assert merged.prompt == adapter.prompt is not None
    own = json.loads((out / GENERATION_FILE).read_text())
    assert own["eos_token_id"] == 2, "the model's own generation config keeps its end-of-turn id"
    assert base_generation_file(str(out)) == adapter.generation
    served = chat_model(load_host(str(out), "fp32"), None)
    assert served.generation_defaults == adapter.generation and served.trained_prompt == adapter.prompt


def test_an_ollama_modelfile_samples_as_the_adapter_is_served(tmp_path):
    from assistant.loading import generation_defaults_of
    from train.export import sampling_parameters

    def modelfile_sampling(folder) -> dict:
        return sampling_parameters(generation_defaults_of("embedded", folder))

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "embedded"}))
    write_generation(tmp_path, {"do_sample": False, "repetition_penalty": 1.05})
    assert modelfile_sampling(tmp_path)["temperature"] == 0.0 and modelfile_sampling(tmp_path)["repeat_penalty"] == 1.05
    write_generation(tmp_path, {"do_sample": True, "temperature": 0.5, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0})
    assert modelfile_sampling(tmp_path) == {"temperature": 0.5, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.0}
