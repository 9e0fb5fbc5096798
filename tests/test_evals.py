"""The Evals API (serve.evals) driven by the real `openai` SDK against the app, and the scores it is built on."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from assistant.scoring import compare, similarity, string_check
from serve.evals.definition import EvalError, check_eval
from tests.conftest import DATA, FAST, sft

PHRASE = "Thank you for contacting support, an agent will call you back today."
SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
          "required": ["question", "answer"]}
ROUGE = {"type": "text_similarity", "name": "rouge", "evaluation_metric": "rouge_l", "pass_threshold": 0.5,
         "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
MENTIONS = {"type": "string_check", "name": "mentions agent", "operation": "ilike",
            "input": "{{sample.output_text}}", "reference": "agent will call"}
PERPLEXITY = {"type": "perplexity", "name": "reference perplexity", "reference": "{{item.answer}}"}
TEMPLATE = {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]}


# -- scores (fast) --------------------------------------------------------------------------------------
def test_string_checks_follow_openais_operations():
    assert string_check("eq", "Yes", "Yes") and not string_check("eq", "Yes", "yes")
    assert string_check("ne", "Yes", "No")
    assert string_check("like", "We will call you", "call") and not string_check("like", "We will CALL", "call")
    assert string_check("ilike", "We will CALL", "call")


def test_similarity_metrics_rank_a_close_reply_above_a_far_one():
    reference = "your order ships on monday"
    for metric in ("rouge_l", "bleu", "fuzzy_match"):
        close, far = similarity(metric, reference, "your order ships on monday"), similarity(metric, reference, "hi")
        assert close == pytest.approx(1.0) and far < 0.5, metric


def test_compare_counts_wins_ties_losses_and_its_interval_excludes_zero_only_for_a_clear_winner():
    a = [0.1, 0.2, 0.3, 0.4, 0.5] * 8
    clear = compare(a, [x + 0.2 for x in a])
    assert (clear.wins, clear.ties, clear.losses) == (40, 0, 0)
    assert clear.mean_difference == pytest.approx(0.2) and clear.interval[0] > 0 and not clear.significantly_worse
    mixed = compare(a, [x + (0.05 if i % 2 else -0.05) for i, x in enumerate(a)])
    assert mixed.interval[0] < 0 < mixed.interval[1], "a coin flip is not a difference"
    worse = compare(a, [x - 0.3 if i < 30 else x for i, x in enumerate(a)])
    assert worse.significantly_worse and worse.losses == 30 and worse.ties == 10
    assert [w["index"] for w in worse.worse][:1] and all(w["difference"] < 0 for w in worse.worse)


@pytest.mark.parametrize(("change", "param"), [
    (lambda b: b["testing_criteria"][0].update(evaluation_metric="cosine"), "testing_criteria[0].evaluation_metric"),
    (lambda b: b["testing_criteria"][0].update(pass_threshold=2), "testing_criteria[0].pass_threshold"),
    (lambda b: b["testing_criteria"][0].update(reference="{{item.solution}}"), "testing_criteria[0].reference"),
    (lambda b: b["testing_criteria"][0].update(type="label_model"), "testing_criteria[0].type"),
    (lambda b: b["testing_criteria"].append(dict(ROUGE)), "testing_criteria[1].name"),
    (lambda b: b["data_source_config"].update(type="sql"), "data_source_config.type"),
    (lambda b: b["data_source_config"]["item_schema"].update(required=["question", "context"]),
     "data_source_config.item_schema.required"),
    (lambda b: b.update(testing_criteria=[]), "testing_criteria"),
])
def test_a_malformed_eval_is_refused_naming_the_field(change, param):
    body = {"name": "x", "data_source_config": {"type": "custom", "item_schema": json.loads(json.dumps(SCHEMA))},
            "testing_criteria": [dict(ROUGE)]}
    check_eval(body)  # the unchanged body is fine
    change(body)
    with pytest.raises(EvalError) as refused:
        check_eval(body)
    assert refused.value.param == param, str(refused.value)


# -- the API (slow: the embedded model) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def client(app_server) -> OpenAI:
    return OpenAI(base_url=app_server.url + "v1", api_key="unused-on-localhost", max_retries=0)


@pytest.fixture(scope="module")
def support(app_server, lora_adapter, tmp_path_factory):
    """An adapter trained to answer every question with PHRASE, listed in the app for this module only."""
    rows = [json.loads(line)["prompt"] for line in (DATA / "valid_pairs.jsonl").read_text().splitlines()]
    data = tmp_path_factory.mktemp("support") / "phrase.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": PHRASE}) + "\n" for p in rows[:24]))
    folder = lora_adapter.parent / "support"
    done = sft(str(data), "--output-dir", str(folder), *FAST, "--max-steps", "12", "--learning-rate", "3e-3",
               "--probes", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    app_server.registry.rescan()
    yield "support"
    shutil.rmtree(folder)
    app_server.registry.rescan()


def items_file(client: OpenAI, tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"item": row}) + "\n" for row in rows))
    return client.files.create(file=path.open("rb"), purpose="evals").id


def run_to_end(client: OpenAI, eval_id: str, model: str, file_id: str, tokens: int = 24):
    run = client.evals.runs.create(eval_id, name=model, data_source={
        "type": "completions", "model": model, "source": {"type": "file_id", "id": file_id},
        "input_messages": TEMPLATE, "sampling_params": {"temperature": 0, "max_completion_tokens": tokens}})
    assert run.status in ("queued", "in_progress")
    deadline = time.monotonic() + 600
    while run.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.5)
        run = client.evals.runs.retrieve(run.id, eval_id=eval_id)
    assert run.status == "completed", run
    return run


@pytest.mark.slow
def test_the_sdk_evaluates_base_and_adapter_over_an_uploaded_file_and_the_adapter_passes_more(
        client, app_server, support, tmp_path):
    questions = [json.loads(line)["prompt"] for line in (DATA / "valid_pairs.jsonl").read_text().splitlines()]
    file_id = items_file(client, tmp_path, [{"question": q, "answer": PHRASE} for q in questions[24:34]])
    created = client.evals.create(name="support phrase",
                                  data_source_config={"type": "custom", "item_schema": SCHEMA},
                                  testing_criteria=[ROUGE, MENTIONS, PERPLEXITY])
    assert client.evals.retrieve(created.id).name == "support phrase"
    base = run_to_end(client, created.id, "base", file_id)
    tuned = run_to_end(client, created.id, support, file_id)
    for run in (base, tuned):
        counts = run.result_counts
        assert counts.total == 10 and counts.passed + counts.failed + counts.errored == 10
        assert {r.testing_criteria for r in run.per_testing_criteria_results} == {"rouge", "mentions agent",
                                                                                  "reference perplexity"}
    assert tuned.result_counts.passed > base.result_counts.passed, (base.result_counts, tuned.result_counts)

    items = client.evals.runs.output_items.list(tuned.id, eval_id=created.id, limit=100).data
    assert len(items) == 10 and [i.datasource_item_id for i in items] == list(range(10))
    first = items[0]
    scores = {r.name: r for r in first.results}
    reply = first.sample.output[0].content
    assert scores["rouge"].score == pytest.approx(similarity("rouge_l", PHRASE, reply), abs=1e-5)
    assert scores["mentions agent"].passed == ("agent will call" in reply.lower())
    assert first.datasource_item["question"] == questions[24]
    assert client.evals.runs.output_items.retrieve(first.id, eval_id=created.id, run_id=tuned.id).id == first.id
    failed = client.evals.runs.output_items.list(base.id, eval_id=created.id, status="fail", limit=100).data
    assert all(i.status == "fail" for i in failed) and len(failed) == base.result_counts.failed

    def perplexity(run) -> float:
        found = client.evals.runs.output_items.list(run.id, eval_id=created.id, limit=100).data
        return sum(next(r.score for r in i.results if r.name == "reference perplexity") for i in found) / len(found)

    assert perplexity(tuned) < perplexity(base), "the adapter finds the phrase it learned far likelier"

    compared = client.get(f"/evals/{created.id}/compare", cast_to=object,
                          options={"params": {"run_a": base.id, "run_b": tuned.id}})
    assert compared["model_a"] == "base" and compared["model_b"] == support
    assert compared["wins"] + compared["ties"] + compared["losses"] == 10
    assert compared["mean_b"] > compared["mean_a"] and compared["interval"][0] > 0
    evidence = app_server.demo.service.evals.store.evidence(support, "base")  # what the promotion gate reads
    assert evidence.eval_id == created.id and evidence.criterion == "rouge"
    assert evidence.candidate_pass_rate > evidence.current_pass_rate and not evidence.comparison.significantly_worse


@pytest.mark.slow
def test_bad_runs_are_refused_by_field_and_line_before_any_work(client, tmp_path):
    created = client.evals.create(name="refusals", data_source_config={"type": "custom", "item_schema": SCHEMA},
                                  testing_criteria=[ROUGE])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"item": {"question": "Hi", "answer": "Hello"}}) + "\n"
                    + json.dumps({"item": {"question": "Hi"}}) + "\n")
    file_id = client.files.create(file=path.open("rb"), purpose="evals").id

    def refused(data_source: dict) -> BadRequestError | NotFoundError:
        with pytest.raises((BadRequestError, NotFoundError)) as error:
            client.evals.runs.create(created.id, data_source=data_source)
        return error.value

    good = {"type": "completions", "model": "base", "source": {"type": "file_id", "id": file_id},
            "input_messages": TEMPLATE}
    error = refused(good)
    assert error.param == "data_source.source.id" and "line 2" in error.message and "'answer'" in error.message
    error = refused({**good, "model": "gpt-9"})
    assert error.status_code == 404 and error.param == "data_source.model"
    error = refused({**good, "input_messages": {"type": "template", "template": [
        {"role": "user", "content": "{{item.topic}}"}]}})
    assert error.param == "data_source.input_messages.template[0].content"
    error = refused({**good, "source": {"type": "file_content", "content": [{"item": {"question": 3, "answer": ""}}]}})
    assert error.param == "data_source.source.content[0].item" and "string" in error.message
    error = refused({**good, "sampling_params": {"temperature": 5}})
    assert error.param == "data_source.sampling_params.temperature"
    assert client.evals.runs.list(created.id).data == [], "nothing was queued"
    with pytest.raises(BadRequestError) as bad_eval:
        client.evals.create(data_source_config={"type": "custom", "item_schema": SCHEMA},
                            testing_criteria=[{**ROUGE, "evaluation_metric": "meteor"}])
    assert bad_eval.value.param == "testing_criteria[0].evaluation_metric"
    with pytest.raises(NotFoundError):
        client.evals.retrieve("eval_unknown")


@pytest.mark.slow
def test_a_run_shows_progress_and_cancel_stops_it(client, app_server, forced_long_replies):
    created = client.evals.create(name="cancel", data_source_config={"type": "custom", "item_schema": SCHEMA},
                                  testing_criteria=[MENTIONS])
    content = [{"item": {"question": f"Tell me a long story number {i}.", "answer": "x"}} for i in range(40)]
    run = client.evals.runs.create(created.id, data_source={
        "type": "completions", "model": "base", "source": {"type": "file_content", "content": content},
        "input_messages": TEMPLATE, "sampling_params": {"temperature": 0, "max_completion_tokens": 400}})
    deadline = time.monotonic() + 120
    while run.status != "in_progress" and time.monotonic() < deadline:
        time.sleep(0.1)
        run = client.evals.runs.retrieve(run.id, eval_id=created.id)
    assert run.status == "in_progress"
    assert run.model_extra["progress"]["total"] == 40
    cancelled = client.evals.runs.cancel(run.id, eval_id=created.id)
    assert cancelled.id == run.id
    while run.status == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.2)
        run = client.evals.runs.retrieve(run.id, eval_id=created.id)
    assert run.status == "canceled"
    assert run.model_extra["progress"]["done"] < 40, "it stopped before answering everything"


@pytest.mark.slow
def test_a_run_whose_model_fails_to_load_fails_with_the_reason(client, app_server, monkeypatch):
    service = app_server.demo.service
    created = client.evals.create(name="broken", data_source_config={"type": "custom", "item_schema": SCHEMA},
                                  testing_criteria=[MENTIONS])

    def broken(model: str):
        raise RuntimeError("weights are corrupt")

    monkeypatch.setattr(service.evals, "resolve", broken)
    run = client.evals.runs.create(created.id, data_source={
        "type": "completions", "model": "base", "input_messages": TEMPLATE,
        "source": {"type": "file_content", "content": [{"item": {"question": "Hi", "answer": "Hello"}}]}})
    ended = service.evals.wait(created.id, run.id, timeout=60)
    assert ended["status"] == "failed" and "weights are corrupt" in ended["error"]["message"]


@pytest.mark.slow
def test_the_evaluate_tab_compares_a_candidate_with_the_model_in_use_on_a_held_out_file(app_server, support, tmp_path):
    from types import SimpleNamespace

    import gradio as gr

    tab = app_server.demo.eval_tab
    local = SimpleNamespace(client=SimpleNamespace(host="127.0.0.1"), headers={}, username=None, session_hash="t")
    candidates, against = tab.menus()
    assert candidates["value"] == support, "the adapter published last is the candidate"
    assert against["value"] == "base", "the model in use is preselected"
    with pytest.raises(gr.Error, match="same model"):
        tab.start("base", "base", str(DATA / "valid_pairs.jsonl"), 4, local)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Only a question"}\n')
    with pytest.raises(gr.Error, match="bad.jsonl:2: missing field .response."):
        tab.start(support, "base", str(bad), 0, local)

    held_out = tmp_path / "held_out.jsonl"  # the rows the support adapter never saw, in train.sft's pair format
    rows = [json.loads(line) for line in (DATA / "valid_pairs.jsonl").read_text().splitlines()][30:36]
    held_out.write_text("".join(json.dumps({"prompt": r["prompt"], "response": PHRASE}) + "\n" for r in rows))
    state = tab.start(support, "base", str(held_out), 0, local)
    deadline = time.monotonic() + 600
    while isinstance((shown := tab.show(state))[1], dict) and time.monotonic() < deadline:  # dict: gr.update()
        assert "items" in shown[0] or "queued" in shown[0]
        time.sleep(1)
    description, summary, figure, worse, _ = shown
    assert description.startswith(f"{support} vs base on 6 items")
    assert list(summary["model"]) == ["base", support] and summary["mean ROUGE-L"][1] > summary["mean ROUGE-L"][0]
    assert summary["reference perplexity"][1] < summary["reference perplexity"][0]
    assert figure is not None and len(figure.axes) == 2
    assert list(worse.columns)[:3] == ["item", "user asked", "reference"]


@pytest.mark.slow
def test_the_reference_perplexity_of_each_model_on_a_shared_host_is_its_own(app_server, lora_adapter):
    from assistant.likelihood import reply_nll
    from serve.registry import BASE_CHOICE

    chat = [{"role": "user", "content": "Can I book a table?"}, {"role": "assistant", "content": "Yes, for how many?"}]
    base = app_server.registry.get(BASE_CHOICE)
    alone = reply_nll(base, chat)
    pirate = app_server.registry.get(lora_adapter.name)  # attached to the same weights as the base
    assert pirate.host is base.host
    assert reply_nll(base, chat) == pytest.approx(alone, rel=1e-4), "the base is scored without any adapter"
    assert reply_nll(pirate, chat, use_adapter=False) == pytest.approx(alone, rel=1e-4)
    assert abs(reply_nll(pirate, chat)[0] - alone[0]) > 1.0, "the adapter's own loss"


@pytest.mark.slow
def test_stored_completions_are_an_eval_source_filtered_by_metadata(client):
    run_tag = f"evals-{time.time_ns()}"
    questions = ["Name a colour.", "Name a fruit.", "Name an animal."]
    stored = [client.chat.completions.create(model="base", messages=[{"role": "user", "content": q}], max_tokens=8,
                                             temperature=0, store=True, metadata={"suite": run_tag})
              for q in questions]
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Unrelated."}], max_tokens=4,
                                   temperature=0, store=True, metadata={"suite": "other"})
    created = client.evals.create(
        name="replay", data_source_config={"type": "stored_completions", "metadata": {"suite": run_tag}},
        testing_criteria=[{"type": "string_check", "name": "same reply", "operation": "eq",
                           "input": "{{sample.output_text}}", "reference": "{{item.output}}"}])
    run = client.evals.runs.create(created.id, data_source={
        "type": "completions", "model": "base", "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
        "source": {"type": "stored_completions", "metadata": {"suite": run_tag}}})
    deadline = time.monotonic() + 300
    while run.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.5)
        run = client.evals.runs.retrieve(run.id, eval_id=created.id)
    assert run.status == "completed" and run.result_counts.total == 3, run
    assert run.result_counts.passed == 3, "greedy decoding replays each stored reply exactly"
    items = client.evals.runs.output_items.list(run.id, eval_id=created.id).data
    assert sorted(i.datasource_item["output"] for i in items) == sorted(c.choices[0].message.content for c in stored)
    with pytest.raises(BadRequestError) as none:
        client.evals.runs.create(created.id, data_source={
            "type": "completions", "model": "base", "source": {"type": "stored_completions",
                                                              "metadata": {"suite": "nothing-stored"}}})
    assert none.value.param == "data_source.source"
