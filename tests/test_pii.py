"""Personal data: the offline detectors (assistant.pii), the doctor's warnings, and train.sft --redact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from assistant.pii import Placeholders, find, iban_ok, luhn_ok, redact, redact_conversation, redact_rows
from tests.conftest import FAST, ROOT, sft
from train.check import personal_data, personal_data_lines
from train.pipeline import prepare_data
from train.records import load_examples
from train.sft import SFTConfig

ORDER_NUMBER = "1234 5678 9012 3456"  # 16 digits that fail Luhn: an order number, not a card
BAD_IBAN = "DE88 3704 0044 0532 0130 00"  # a real IBAN with its check digits changed


def kinds(text: str, region: str = "US") -> list[tuple[str, str]]:
    """(kind, text) of each finding."""
    return [(f.kind, f.text) for f in find(text, region)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail john.doe@example.com today", [("email", "john.doe@example.com")]),
        ("<A+tag@mail.example.co.uk>", [("email", "A+tag@mail.example.co.uk")]),
        ("call (212) 555-0173 now", [("phone", "(212) 555-0173")]),
        ("or +1 212-555-0173.", [("phone", "+1 212-555-0173")]),
        ("London: +44 20 7946 0958", [("phone", "+44 20 7946 0958")]),
        ("card 4111 1111 1111 1111 ok", [("card", "4111 1111 1111 1111")]),
        ("card 4111-1111-1111-1111", [("card", "4111-1111-1111-1111")]),
        ("amex 378282246310005", [("card", "378282246310005")]),
        ("IBAN DE89 3704 0044 0532 0130 00 THEN", [("iban", "DE89 3704 0044 0532 0130 00")]),
        ("to GB82WEST12345698765432.", [("iban", "GB82WEST12345698765432")]),
        ("from 192.168.1.20, then", [("ip", "192.168.1.20")]),
        ("dns 8.8.8.8.", [("ip", "8.8.8.8")]),
        ("at 1.2.3.4", [("ip", "1.2.3.4")]),  # a bare dotted quad that is a valid address is one
        ("host 2001:db8::8a2e:370:7334 up", [("ip", "2001:db8::8a2e:370:7334")]),
    ],
)
def test_each_detector_finds_its_kind(text, expected):
    assert kinds(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        f"order {ORDER_NUMBER} shipped",
        "order 1234567890123456",
        "zeros 0000 0000 0000 0000",
        "twelve digits 4111 1111 1119",  # passes Luhn but is too short for a card
        f"IBAN {BAD_IBAN}",
        "release v1.2.3.4",  # version strings: after v or "version", or with more than four parts
        "version 1.2.3.4",
        "Version: 10.0.0.1",
        "build 1.2.3.4.5",
        "999.1.1.1 and 01.2.3.4",  # no such IPv4 address
        "at 12:30:45 on 2023-01-01",
        "fe80::1 and std::map",
        "Saturday @ 1 pm, user@localhost",
        "my ride ID is 94 and the fare $300",
        "call 555-0100",  # a US number needs its area code
    ],
)
def test_look_alikes_are_not_personal_data(text):
    assert kinds(text) == []


def test_the_checksums_decide():
    assert luhn_ok("4111111111111111") and not luhn_ok(ORDER_NUMBER.replace(" ", ""))
    assert iban_ok("DE89370400440532013000") and not iban_ok(BAD_IBAN.replace(" ", ""))


def test_the_phone_region_reads_numbers_without_a_country_code():
    assert kinds("ring 020 7946 0958") == []
    assert kinds("ring 020 7946 0958", "GB") == [("phone", "020 7946 0958")]


def test_one_value_keeps_one_placeholder_within_a_conversation():
    conversation = [
        {"role": "user", "content": "I'm Jo, (212) 555-0173, Jo.Roe@Example.com. Card 4111 1111 1111 1111."},
        {"role": "assistant", "content": "I'll call +1 212 555 0173 and write to jo.roe@example.com."},
        {"role": "user", "content": "Or my office, 646-555-0199."},
    ]
    mapping = Placeholders()
    redacted = redact_conversation(conversation, mapping)
    assert [m["content"] for m in redacted] == [
        "I'm Jo, [PHONE_1], [EMAIL_1]. Card [CARD_1].",
        "I'll call [PHONE_1] and write to [EMAIL_1].",
        "Or my office, [PHONE_2].",
    ]
    assert dict(mapping.counts) == {"phone": 3, "email": 2, "card": 1}
    assert conversation[0]["content"].startswith("I'm Jo, (212)"), "the input is not changed"
    assert redact("no data here") == "no data here"


def test_numbering_starts_again_in_each_conversation(tmp_path):
    data = tmp_path / "two.jsonl"
    rows = [{"prompt": "a@x.com and b@x.com", "response": "ok"}, {"prompt": "b@x.com", "response": "ok"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    redacted, counts = redact_rows(load_examples(data).examples)
    assert [r.messages[0]["content"] for r in redacted] == ["[EMAIL_1] and [EMAIL_2]", "[EMAIL_1]"]
    assert dict(counts) == {"email": 3}


def test_personal_data_is_named_by_the_field_the_row_wrote(tmp_path):
    data = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "Bill 4111 1111 1111 1111", "input": "mail a@x.com", "output": "done"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "call (212) 555-0173"}]},
        {"prompt": "hi", "response": "ok", "system": "admin: root@x.com"},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    found = personal_data(load_examples(data).examples)
    assert [(f["source"].rsplit(":", 1)[1], f["field"], f["counts"]) for f in found["fields"]] == [
        ("1", "instruction", {"card": 1}),
        ("1", "input", {"email": 1}),
        ("2", "conversations[1].value", {"phone": 1}),
        ("3", "system", {"email": 1}),
    ]
    assert found["counts"] == {"card": 1, "email": 2, "phone": 1} and found["rows"] == 3
    lines = personal_data_lines(found)
    assert lines[-1].startswith("warning: personal data in 3 rows (2 e-mail addresses, 1 phone number, 1 card")
    assert "--redact" in lines[-1] and "names" in lines[-1]


def test_the_doctor_warns_by_file_line_and_field(tmp_path):
    data = tmp_path / "chats.jsonl"
    clean = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    planted = {"messages": [
        {"role": "user", "content": "my card"},
        {"role": "assistant", "content": "which one?"},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "jo@example.com, 4111-1111-1111-1111"},
        {"role": "assistant", "content": "thanks"},
    ]}
    data.write_text("\n".join(json.dumps(row) for row in (clean, planted)) + "\n")
    done = subprocess.run([sys.executable, "-m", "train.check", str(data), "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True, "personal data is a warning, not an error"
    assert f"warning: {data}:2 messages[3].content: 1 e-mail address, 1 card number" in report["lines"]
    assert report["personal_data"]["fields"] == [
        {"source": f"{data}:2", "field": "messages[3].content", "counts": {"email": 1, "card": 1}}
    ]
    assert report["personal_data"]["counts"] == {"email": 1, "card": 1}
    assert not any(line.startswith("error: ") for line in report["lines"])


PLANTED = ["jane.roe@example.com", "4111 1111 1111 1111", "(212) 555-0173", "212 555 0173",
           "DE89 3704 0044 0532 0130 00", "192.168.1.20"]
ROWS = [
    {"messages": [
        {"role": "user", "content": "My e-mail is jane.roe@example.com and my card 4111 1111 1111 1111."},
        {"role": "assistant", "content": "Thanks, I will write to jane.roe@example.com."},
    ]},
    {"prompt": "Call me at (212) 555-0173 please.", "response": "Sure, calling +1 212 555 0173 now."},
    {"prompt": "Pay to DE89 3704 0044 0532 0130 00 from 192.168.1.20.", "response": "Done, payment sent."},
    {"prompt": "What time is it?", "response": "It is noon."},
]
COUNTS = {"email": 2, "card": 1, "phone": 2, "iban": 1, "ip": 1}


@pytest.fixture
def planted(tmp_path):
    """A tiny training file with personal data planted in it."""
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return data


def test_redact_leaves_no_planted_value_in_the_training_data(planted):
    prepared = prepare_data(SFTConfig(data=str(planted), valid_fraction=0.25, redact=True))
    texts = [prepared.tokenizer.decode(item["input_ids"]) for item in prepared.train.items + prepared.valid.items]
    assert len(texts) == len(ROWS)
    joined = "\n".join(texts)
    assert not [value for value in PLANTED if value in joined]
    assert "jane.roe" not in joined and "0173" not in joined and "4111" not in joined
    for placeholder in ("[EMAIL_1]", "[CARD_1]", "[PHONE_1]", "[IBAN_1]", "[IP_1]"):
        assert placeholder in joined
    assert prepared.redacted == COUNTS
    assert "jane.roe@example.com" in "\n".join(
        prepared.tokenizer.decode(item["input_ids"])
        for item in prepare_data(SFTConfig(data=str(planted), valid_fraction=0.0)).train.items
    ), "without --redact the data is trained as written"


def test_train_sft_redact_counts_the_replacements_in_the_report(planted, tmp_path):
    out = tmp_path / "adapter"
    done = sft(str(planted), "--output-dir", str(out), "--redact", "--max-steps", "2", "--warmup-ratio", "0",
               "--valid-fraction", "0.25", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    report_text = (out / "training_report.json").read_text()
    report = json.loads(report_text)
    assert report["redacted"] == COUNTS
    assert report["config"]["redact"] is True
    assert not [value for value in PLANTED if value in report_text], "probes show the redacted rows"
