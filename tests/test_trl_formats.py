"""TRL's dataset formats, standard and conversational, read from local files (jsonl, json,
parquet, csv) into rlhfkit's rows; a malformed row names its file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlhfkit
from rlhfkit import Conversation, DataError, Feedback, Preference, Prompt, PromptCompletion

U = [{"role": "user", "content": "What colour is the sky?"}]
A = [{"role": "assistant", "content": "Blue."}]
B = [{"role": "assistant", "content": "Green."}]
PROMPT = ({"role": "user", "content": "What colour is the sky?"},)

# (TRL format, schema, a TRL record, the rlhfkit row it becomes)
FORMATS = [
    ("language modeling", "text", {"text": "The sky is blue."}, PromptCompletion("", "The sky is blue.")),
    ("language modeling, conversational", "messages", {"messages": U + A},
     Conversation(tuple(U + A))),
    ("prompt-only", "prompt", {"prompt": "The sky is"}, Prompt("The sky is")),
    ("prompt-only, conversational", "prompt", {"prompt": U}, Prompt(PROMPT)),
    ("prompt-completion", "prompt-completion", {"prompt": "The sky is", "completion": " blue."},
     PromptCompletion("The sky is", " blue.")),
    ("prompt-completion, conversational", "prompt-completion", {"prompt": U, "completion": A},
     PromptCompletion(PROMPT, "Blue.")),
    ("preference, explicit prompt", "preference", {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     Preference("The sky is", " blue.", " green.")),
    ("preference, explicit prompt, conversational", "preference", {"prompt": U, "chosen": A, "rejected": B},
     Preference(PROMPT, "Blue.", "Green.")),
    ("preference, implicit prompt", "preference", {"chosen": "The sky is blue.", "rejected": "The sky is green."},
     Preference("The sky is", " blue.", " green.")),
    ("preference, implicit prompt, conversational", "preference", {"chosen": U + A, "rejected": U + B},
     Preference(PROMPT, "Blue.", "Green.")),
    ("unpaired preference", "unpaired", {"prompt": "The sky is", "completion": " green.", "label": False},
     Feedback("The sky is", " green.", False)),
    ("unpaired preference, conversational", "unpaired", {"prompt": U, "completion": A, "label": True},
     Feedback(PROMPT, "Blue.", True)),
]

# one malformed record per schema, and what the error says about it
MALFORMED = {
    "text": ({"text": ""}, "field 'text' is empty"),
    "messages": ({"messages": U}, "must end with an assistant message"),
    "prompt": ({"prompt": A}, "must end with a user message"),
    "prompt-completion": ({"prompt": U, "completion": U}, "must be text or one assistant message"),
    "preference": ({"chosen": U + A, "rejected": B}, "not the same conversation"),
    "unpaired": ({"prompt": U, "completion": A, "label": "maybe"}, "field 'label' must be true"),
}


@pytest.fixture(scope="module")
def registry() -> rlhfkit.Registry:
    return rlhfkit.load_plugins().registry


def load(registry, path: Path, schema: str):
    return registry.build(rlhfkit.ref("dataset")(name="file", path=str(path), schema=schema), None)


@pytest.mark.parametrize(("name", "schema", "record", "row"), FORMATS, ids=[f[0] for f in FORMATS])
def test_each_trl_format_reads_from_jsonl_and_parquet(registry, tmp_path, name, schema, record, row):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    assert load(registry, jsonl, schema).rows() == [row, row]
    import datasets

    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_list([record, record]).to_parquet(str(parquet))
    assert load(registry, parquet, schema).rows() == [row, row]


@pytest.mark.parametrize(("name", "schema", "record", "row"),
                         [f for f in FORMATS if "conversational" not in f[0]],
                         ids=[f[0] for f in FORMATS if "conversational" not in f[0]])
def test_standard_formats_read_from_csv_and_a_json_array(registry, tmp_path, name, schema, record, row):
    import csv

    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(record))
        writer.writeheader()
        writer.writerow({k: str(v).lower() if isinstance(v, bool) else v for k, v in record.items()})
    assert load(registry, path, schema).rows() == [row]
    array = tmp_path / "data.json"
    array.write_text(json.dumps([record]))
    assert load(registry, array, schema).rows() == [row]


@pytest.mark.parametrize("schema", sorted(MALFORMED))
def test_a_malformed_row_names_file_and_row(registry, tmp_path, schema):
    good = next(record for _, s, record, _ in FORMATS if s == schema)
    bad, says = MALFORMED[schema]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as error:
        load(registry, path, schema).rows()
    message = str(error.value)
    assert f"{path} line 2" in message and says in message, message


def test_prompt_rows_keep_their_other_columns_for_rewards(registry, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": U, "answer": "blue", "id": 7}) + "\n")
    (row,) = load(registry, path, "prompt").rows()
    assert row.prompt == PROMPT and row.fields == {"answer": "blue", "id": 7}


def test_a_message_with_an_unknown_role_or_no_content_is_reported(registry, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "robot", "content": "hi"}]}) + "\n"
                    + json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    dataset = registry.build(rlhfkit.ref("dataset")(name="file", path=str(path), schema="prompt",
                                                     on_error="skip"), None)
    with pytest.raises(DataError) as error:
        dataset.rows()  # no valid row at all
    message = str(error.value)
    assert "line 1: field 'prompt' [0].role must be one of system, user, assistant, got str 'robot'" in message
    assert "line 2: field 'prompt' [0].content must be non-empty text" in message
    assert message.count("line 1") == 1
