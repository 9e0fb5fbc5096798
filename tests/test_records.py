"""File -> records: every format, every malformed fixture in tests/data/bad, and error reporting."""

import json
import logging
from pathlib import Path

import pytest

from tests.conftest import NEEDS_DATASETS
from train.records import DataError, Example, load_examples, load_preferences

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
EXPECTED = json.loads((BAD / "expected.json").read_text(encoding="utf-8"))

PAIR = {"prompt": "Where is my order?", "response": "Could I get your full name, please?"}
CHAT = {
    "messages": [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
}


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows as JSON Lines and return the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def all_text(examples: list[Example]) -> list[str]:
    """Every message content of every example."""
    return [m["content"] for ex in examples for m in ex.messages]


def test_fixture_table_is_complete():
    files = {p.name for p in BAD.iterdir()} - {"expected.json", "README.md"}
    assert files == set(EXPECTED) and len(files) == 18


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_fixture(name, caplog):
    spec, path = EXPECTED[name], BAD / name
    if spec["expect"] == "error":
        with pytest.raises(DataError) as info:
            load_examples(path)
        message = str(info.value)
        assert name in message
        if "line" in spec:
            assert f":{spec['line']}:" in message
        if "field" in spec:
            assert f"'{spec['field']}'" in message
        for line in spec.get("also", []):
            assert f"{name}:{line}:" in message
        return
    with caplog.at_level(logging.WARNING, logger="train.records"):
        result = load_examples(path)
    assert len(result.examples) == spec["rows"]
    if spec["expect"] == "warn":
        hits = [w for w in result.warnings if f"{name}:{spec['line']}:" in w and f"'{spec['field']}'" in w]
        assert hits, result.warnings
        assert hits[0] in caplog.text
    else:
        assert result.warnings == []
        assert not any("\r" in t or "\ufeff" in t for t in all_text(result.examples))


def test_specific_messages():
    def error(name: str) -> str:
        with pytest.raises(DataError) as info:
            load_examples(BAD / name)
        return str(info.value)

    assert (
        f"{BAD / 'missing_response_key.jsonl'}:4: missing field 'response' (found keys: prompt, answer)"
        in error("missing_response_key.jsonl")
    )
    assert "got list" in error("wrong_type_list.jsonl") and "got int" in error("wrong_type_list.jsonl")
    assert "got null" in error("wrong_type_list.jsonl")
    assert "UTF-8" in error("non_utf8_byte.jsonl") and "byte offset" in error("non_utf8_byte.jsonl")
    assert "JSON array" in error("json_array_not_jsonl.jsonl")
    assert "truncated" in error("truncated_last_line.jsonl")
    assert "truncated" not in error("invalid_json_line.jsonl")
    assert "expected a JSON object, got a string" in error("non_object_line.jsonl")
    assert "ambiguous" in error("ambiguous_both_formats.jsonl")
    assert "has no examples" in error("empty_file.jsonl")


def test_bom_and_crlf_are_invisible():
    bom = load_examples(BAD / "bom_at_start.jsonl").examples
    assert bom[0].messages[0]["content"].startswith("I'm looking")
    assert bom[0].source.endswith("bom_at_start.jsonl:1")


def test_blank_lines_keep_line_numbers():
    sources = [ex.source.rsplit(":", 1)[1] for ex in load_examples(BAD / "blank_lines.jsonl").examples]
    assert sources == ["2", "4", "7", "8"]


def test_missing_path():
    with pytest.raises(DataError) as info:
        load_examples(DATA / "nope.jsonl")
    assert str(info.value) == f"{DATA / 'nope.jsonl'}: no such file"


def test_pairs_with_system(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{**PAIR, "system": "Be brief."}, PAIR])
    result = load_examples(path)
    assert result.examples[0] == Example(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": PAIR["prompt"]},
            {"role": "assistant", "content": PAIR["response"]},
        ],
        f"{path}:1",
        "pairs",
    )
    assert [m["role"] for m in result.examples[1].messages] == ["user", "assistant"]
    assert result.formats == {"pairs": 2}


def test_messages(tmp_path):
    result = load_examples(write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    assert result.examples[0].messages == CHAT["messages"]
    assert result.examples[0].format == "messages"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "x"},
                {"role": "assistant", "content": "y"},
            ],
            "messages[1].role",
        ),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}], "messages[1].content"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "messages[1].content"),
        ([{"role": "user", "content": "Hi"}], "messages"),
        ([], "messages"),
        ("hello", "messages"),
    ],
)
def test_messages_errors(tmp_path, messages, field):
    with pytest.raises(DataError) as info:
        load_examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]))
    assert "c.jsonl:1: " in str(info.value) and f"'{field}'" in str(info.value)


def test_sharegpt(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "user", "value": "Bye"},
            {"from": "assistant", "value": "Goodbye."},
        ]
    }
    result = load_examples(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert [m["role"] for m in result.examples[0].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert result.examples[0].messages[2]["content"] == "Hello!"
    assert result.formats == {"sharegpt": 1}
    row["conversations"][1]["from"] = "bot"
    with pytest.raises(DataError, match=r"'conversations\[1\]\.from'"):
        load_examples(write_jsonl(tmp_path / "s.jsonl", [row]))


def test_alpaca(tmp_path):
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye!"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "a.jsonl", rows)).examples
    assert examples[0].messages == [
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    assert examples[1].messages[0]["content"] == "Say hi."
    assert examples[2].messages[0]["content"] == "Say bye." and examples[2].format == "alpaca"


def test_mixed_formats_in_one_file(tmp_path):
    rows = [
        PAIR,
        CHAT,
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"instruction": "i", "output": "o"},
    ]
    result = load_examples(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [ex.format for ex in result.examples] == ["pairs", "messages", "sharegpt", "alpaca"]
    assert result.formats == {"pairs": 1, "messages": 1, "sharegpt": 1, "alpaca": 1}


def test_row_of_no_known_format(tmp_path):
    with pytest.raises(DataError, match=r":1: missing field.*found keys: question, answer"):
        load_examples(write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}]))


def test_reports_several_problems_at_once(tmp_path):
    rows = [
        PAIR,
        {"prompt": "", "response": "r"},
        "text",
        {"prompt": "p"},
        PAIR,
        {"prompt": 1, "response": []},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    path.write_bytes(path.read_bytes() + b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError) as info:
        load_examples(path)
    problems = info.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "6", "6", "7"]
    assert str(info.value).splitlines() == problems


def test_many_problems_are_counted(tmp_path):
    with pytest.raises(DataError) as info:
        load_examples(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}] * 25))
    assert len(info.value.problems) == 25
    lines = str(info.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 5 more problems"


def test_long_field_threshold(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "x" * 101, "response": "ok"}])
    assert load_examples(path).warnings == []
    warnings = load_examples(path, long_field_chars=100).warnings
    assert len(warnings) == 1 and f"{path}:1: field 'prompt'" in warnings[0]


def test_crlf_inside_strings_is_normalised(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a\r\nb", "response": "c\rd"}])
    assert all_text(load_examples(path).examples) == ["a\nb", "c\nd"]


def test_csv_pairs(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"\xef\xbb\xbfprompt,response,system\r\n"
        b'Hi,"Hello, how can I help?",\r\n'
        b"\r\n"
        b'"Two\r\nlines",Sure,Be brief.\r\n'
        b"Next,Ok,\r\n"
    )
    examples = load_examples(path).examples
    assert [ex.source for ex in examples] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    assert examples[0].messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
    ]
    assert examples[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert examples[1].messages[1]["content"] == "Two\nlines"


def test_csv_alpaca_and_errors(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nTranslate,Hello,Bonjour\nSay hi,,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv:3: field 'output' is empty"):
        load_examples(path)
    path.write_text("instruction,input,output\nTranslate,Hello,Bonjour\n", encoding="utf-8")
    assert load_examples(path).examples[0].messages[0]["content"] == "Translate\n\nHello"
    path.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv:1: CSV header"):
        load_examples(path)


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason=NEEDS_DATASETS)
    # from_list takes its columns from the first row; the second row's missing system is stored as null
    rows = [{"prompt": "Hi", "response": "Hello", "system": "Be brief."}, PAIR]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    result = load_examples(tmp_path / "ds")
    assert [ex.source for ex in result.examples] == [f"{tmp_path / 'ds'}:row 0", f"{tmp_path / 'ds'}:row 1"]
    assert [len(ex.messages) for ex in result.examples] == [3, 2]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([CHAT])}).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd").examples[0].messages == CHAT["messages"]
    datasets.Dataset.from_list([{"prompt": "p", "response": 5}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad:row 0: field 'response' must be a string"):
        load_examples(tmp_path / "bad")


def test_plain_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not one saved by datasets"):
        load_examples(tmp_path)


def test_sample_and_valid_files_load():
    root = Path(__file__).parent.parent
    sample = load_examples(root / "data" / "dialogs.jsonl")
    assert sample.formats == {"pairs": 240, "messages": 60}
    assert len(load_examples(DATA / "valid_pairs.jsonl").examples) == 40
    assert len(load_examples(DATA / "valid_chat.jsonl").examples) == 10


def _write(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_preference_rows_load_in_both_formats(tmp_path):
    user = [{"role": "user", "content": "Hi"}]
    path = _write(tmp_path, [
        {"input": {"messages": user}, "preferred_output": [{"role": "assistant", "content": "Hello!"}],
         "non_preferred_output": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": "Hi", "system": "Be kind.", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
    ])
    pairs = load_preferences(path).pairs
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (user, "Hello!", "Go away."),
        ([{"role": "system", "content": "Be kind."}, *user], "Hello!", "Go away."),
        (user, "Hello!", "Go away."),
    ]
    assert [p.format for p in pairs] == ["openai_preference", "prompt_chosen_rejected", "prompt_chosen_rejected"]
    # The doctor names the row's own fields when it finds personal data in them.
    assert [n for _, _, n in pairs[0].scan_example().fields] == [
        "input.messages[0].content", "preferred_output[0].content", "non_preferred_output[0].content"]


def test_malformed_preference_rows_are_refused_by_line_and_field(tmp_path):
    reply = [{"role": "assistant", "content": "Hello!"}]
    path = _write(tmp_path, [
        {"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "user",
         "content": "Hello!"}], "non_preferred_output": reply},
        {"input": {"messages": [{"role": "assistant", "content": "Hi"}]}, "preferred_output": "a",
         "non_preferred_output": "b"},
        {"prompt": "Hi", "chosen": "Hello!"},
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Hi", "response": "Hello!"},
        {"input": {}, "preferred_output": [], "non_preferred_output": [{"role": "assistant", "content": 3}]},
        "not json",
    ])
    with pytest.raises(DataError) as refused:
        load_preferences(path)
    assert refused.value.problems == [
        f"{path}:1: field 'preferred_output[0].role' must be 'assistant', got 'user'",
        f"{path}:2: field 'input.messages' ends with an assistant message; the conversation must end with the user "
        "message the replies answer",
        f"{path}:3: missing field 'rejected' (found keys: prompt, chosen)",
        f"{path}:4: fields 'chosen' and 'rejected' are the same reply; a pair teaches a preference only when they "
        "differ",
        f"{path}:5: not a preference row: need 'input'/'preferred_output'/'non_preferred_output' (OpenAI's preference "
        "rows) or 'prompt'/'chosen'/'rejected' (found keys: prompt, response)",
        f"{path}:6: missing field 'input.messages' (found keys: none)",
        f"{path}:6: field 'preferred_output' must be a list of one assistant message "
        '([{"role": "assistant", "content": "..."}]), got a list of 0',
        f"{path}:6: field 'non_preferred_output[0].content' must be a string, got int",
        f"{path}:7: invalid JSON: Expecting value (column 1)",
    ]


def test_train_sft_points_a_preference_file_to_train_dpo(tmp_path):
    path = _write(tmp_path, [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    with pytest.raises(DataError, match=r"prefs.jsonl:1: a preference row .* python -m train.dpo"):
        load_examples(path)
