"""The ``file`` dataset: every schema, every format, and the errors users will meet."""

from __future__ import annotations

import json
import logging
import os
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rlhfkit
import rlhfkit.plugins.datasets as file_plugin
from rlhfkit import (
    Conversation,
    DataError,
    Preference,
    Prompt,
    PromptCompletion,
    Ranking,
    UserError,
)

PREFS = [
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
    {"prompt": "Count to two.", "chosen": "1, 2", "rejected": "7"},
]


@pytest.fixture(scope="module")
def registry() -> rlhfkit.Registry:
    reg = rlhfkit.Registry()
    reg.extend(file_plugin.rlhfkit_components())
    return reg


def load(registry: rlhfkit.Registry, path: Path | str, **settings):
    reference = rlhfkit.ref("dataset")(name="file", path=str(path), **settings)
    return registry.build(reference, None)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ---------------------------------------------------------------- schemas (jsonl)


def test_prompt_completion(registry, tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    assert load(registry, file, schema="prompt-completion").rows() == [
        PromptCompletion(prompt="2+2=", completion=" 4")]


def test_preference_with_margin(registry, tmp_path):
    records = [dict(PREFS[0], margin=2.5), PREFS[1]]
    rows = load(registry, write_jsonl(tmp_path / "p.jsonl", records), schema="preference").rows()
    assert rows == [Preference("Say hi.", "Hi!", "Go away.", 2.5),
                    Preference("Count to two.", "1, 2", "7", None)]


def test_ranking_with_ties(registry, tmp_path):
    record = {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 0, 1]}
    rows = load(registry, write_jsonl(tmp_path / "r.jsonl", [record]), schema="ranking").rows()
    assert rows == [Ranking(prompt="p", completions=("a", "b", "c"), ranks=(1, 0, 1))]


def test_ranking_from_scores(registry, tmp_path):
    record = {"prompt": "p", "completions": ["a", "b", "c", "d"], "scores": [0.5, 2.0, 0.5, -1]}
    rows = load(registry, write_jsonl(tmp_path / "r.jsonl", [record]), schema="ranking").rows()
    assert rows[0].ranks == (1, 0, 1, 3)  # equal scores tie; rank = how many scored higher


def test_ranks_win_over_scores_and_scores_fill_in(registry, tmp_path):
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1], "scores": [1.0, 2.0]},
        {"prompt": "p", "completions": ["a", "b"], "ranks": None, "scores": [1.0, 2.0]},
    ]), tmp_path / "r.parquet")  # list columns in parquet, too
    rows = load(registry, tmp_path / "r.parquet", schema="ranking").rows()
    assert [r.ranks for r in rows] == [(0, 1), (1, 0)]


def test_messages(registry, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    rows = load(registry, write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}]),
                schema="messages").rows()
    assert rows == [Conversation(messages=tuple(chat))]


def test_prompt_and_text(registry, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Tell a joke."}])
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
    assert load(registry, prompts, schema="prompt").rows() == [Prompt("Tell a joke.")]
    assert load(registry, texts, schema="text").rows() == [PromptCompletion("", "Once upon a time.")]


# ------------------------------------------------------------------------ formats


def test_preference_from_parquet_csv_arrow_and_json(registry, tmp_path):
    table = pa.Table.from_pylist(PREFS)
    pq.write_table(table, tmp_path / "p.parquet")
    table.to_pandas().to_csv(tmp_path / "p.csv", index=False)
    # Both Arrow IPC layouts: the stream one `datasets` writes, and Feather v2's file one.
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(tmp_path / "file.feather"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "p.json").write_text(json.dumps(PREFS))
    expected = [Preference(**r) for r in PREFS]
    for name in ("p.parquet", "p.csv", "stream.arrow", "file.feather", "p.json"):
        assert load(registry, tmp_path / name, schema="preference").rows() == expected, name


def test_csv_keeps_text_as_text(registry, tmp_path):
    (tmp_path / "p.csv").write_text('prompt,chosen,rejected,margin\n007,"a, b","x\ny",1.5\n')
    assert load(registry, tmp_path / "p.csv", schema="preference").rows() == [
        Preference("007", "a, b", "x\ny", 1.5)]


def test_csv_cannot_hold_list_schemas(registry, tmp_path):
    (tmp_path / "r.csv").write_text("prompt,completions,ranks\np,a,0\n")
    with pytest.raises(UserError, match="CSV file cannot hold"):
        load(registry, tmp_path / "r.csv", schema="ranking")
    with pytest.raises(DataError, match="CSV file cannot hold"):  # found only via the glob
        load(registry, tmp_path / "*", schema="messages")


def test_explicit_format_overrides_the_ending(registry, tmp_path):
    file = write_jsonl(tmp_path / "prefs.txt", PREFS)
    with pytest.raises(UserError, match="set format:"):
        load(registry, file, schema="preference")
    assert len(load(registry, file, schema="preference", format="jsonl").rows()) == 2


def test_glob_reads_files_in_sorted_order(registry, tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl", [PREFS[1]])
    write_jsonl(tmp_path / "part-0.jsonl", [PREFS[0]])
    dataset = load(registry, tmp_path / "part-*.jsonl", schema="preference")
    assert [r.prompt for r in dataset.rows()] == ["Say hi.", "Count to two."]
    assert [f.name for f in dataset.files] == ["part-0.jsonl", "part-1.jsonl"]


def test_relative_paths_use_the_current_directory(registry, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "p.jsonl", PREFS)
    monkeypatch.chdir(tmp_path)
    assert len(load(registry, "p.jsonl", schema="preference").rows()) == 2


# ----------------------------------------------------------------- column layouts


def test_dahoas_rm_static_layout(registry, tmp_path):
    record = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "response": " Hello.",
              "chosen": " Hello.", "rejected": " What?"}
    rows = load(registry, write_jsonl(tmp_path / "rm.jsonl", [record]),
                schema="preference").rows()
    assert rows == [Preference(record["prompt"], " Hello.", " What?")]


def test_column_renaming(registry, tmp_path):
    file = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "answer": "Because.",
                                                "prompt": "ignored: renamed column wins"}])
    rows = load(registry, file, schema="prompt-completion",
                columns={"question": "prompt", "answer": "completion"}).rows()
    assert rows == [PromptCompletion("Why?", "Because.")]


def test_renaming_to_an_unknown_field_is_a_config_error(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", PREFS)
    with pytest.raises(UserError, match="'answer' to 'completion', which schema 'preference'"):
        load(registry, file, schema="preference", columns={"answer": "completion"})


# -------------------------------------------------------------------------- errors


def test_malformed_row_names_file_line_and_field(registry, tmp_path):
    records = [PREFS[0], PREFS[1], {"prompt": "p", "chosen": 5, "rejected": "r"}]
    file = tmp_path / "prefs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n\n" for r in records))  # blank lines count
    with pytest.raises(DataError) as caught:
        load(registry, file, schema="preference").rows()
    message = str(caught.value)
    assert "prefs.jsonl line 5" in message and "'chosen'" in message and "got int 5" in message


def test_missing_field_in_a_row_says_how_to_map_columns(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", [PREFS[0], {"prompt": "p", "rejected": "r"}])
    with pytest.raises(DataError, match=r"line 2: field 'chosen' is missing .*columns:"):
        load(registry, file, schema="preference").rows()


def test_row_errors_name_renamed_columns_and_row_index(registry, tmp_path):
    pq.write_table(pa.Table.from_pylist([{"q": "ok", "a": "fine"}, {"q": "  ", "a": "x"}]),
                   tmp_path / "qa.parquet")
    dataset = load(registry, tmp_path / "qa.parquet", schema="prompt-completion",
                   columns={"q": "prompt", "a": "completion"})
    with pytest.raises(DataError, match=r"qa.parquet row 1 \(0-based\): field 'q' \(read as "
                                        r"'prompt'\) is empty"):
        dataset.rows()


@pytest.mark.parametrize("record, problem", [
    ({"completions": ["a", "b"], "ranks": [0]}, "'ranks' has 1 entries"),
    ({"completions": ["a", "b"], "ranks": [1, 2]}, "rank 0 to the best"),
    ({"completions": ["a", "b"], "ranks": [0, 0]}, "ties every completion"),
    ({"completions": ["a"], "ranks": [0]}, "'completions' should have at least 2 items, not 1"),
    ({"completions": ["a", "b"], "ranks": None, "scores": None}, "'ranks' is missing"),
])
def test_invalid_rankings(registry, tmp_path, record, problem):
    file = write_jsonl(tmp_path / "r.jsonl", [dict(record, prompt="p")])
    with pytest.raises(DataError, match=problem):
        load(registry, file, schema="ranking").rows()


@pytest.mark.parametrize("roles, problem", [
    (["user", "assistant", "user"], "must end with an assistant"),
    (["user", "system", "assistant"], "system message only first"),
    (["system", "assistant"], "needs a user message"),
    (["user", "tool"], r"'messages\[1\].role' should be 'system', 'user' or 'assistant'"),
])
def test_invalid_conversations(registry, tmp_path, roles, problem):
    chat = [{"role": role, "content": "text"} for role in roles]
    file = write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}])
    with pytest.raises(DataError, match=problem):
        load(registry, file, schema="messages").rows()


def test_skip_counts_and_warns_once(registry, tmp_path, caplog):
    records = [PREFS[0], {"prompt": "p", "chosen": "", "rejected": "r"}, PREFS[1],
               {"prompt": "p", "chosen": "c"}]
    dataset = load(registry, write_jsonl(tmp_path / "p.jsonl", records), schema="preference",
                   on_error="skip")
    with caplog.at_level(logging.WARNING):
        assert len(dataset.rows()) == 2
        dataset.rows()
    assert dataset.skipped == 2
    assert "line 2" in dataset.problems[0] and "line 4" in dataset.problems[1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 malformed row(s) of 4" in warnings[0].getMessage()


def test_skip_still_fails_when_no_row_is_valid(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(DataError, match="no valid rows .*: all 1 read were malformed"):
        load(registry, file, schema="preference", on_error="skip").rows()


def test_missing_column_is_one_error_for_the_file(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "completion": "c"}] * 3)
    with pytest.raises(DataError) as caught:
        load(registry, file, schema="prompt-completion").rows()
    message = str(caught.value)
    assert "has no column for prompt" in message and "question, completion" in message
    assert "line" not in message


def test_a_preference_file_without_prompts_is_read_as_implicit_prompts(registry, tmp_path):
    """Without a prompt column, preference rows are TRL's implicit-prompt format; a row
    whose texts share no beginning says how to map a prompt column instead."""
    file = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "c", "rejected": "r"}] * 3)
    with pytest.raises(DataError) as caught:
        load(registry, file, schema="preference").rows()
    message = str(caught.value)
    assert "line 1" in message and "columns: {COLUMN: prompt}" in message


def test_empty_data_is_an_error(registry, tmp_path):
    (tmp_path / "p.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows in .*the data is empty"):
        load(registry, tmp_path / "p.jsonl", schema="preference", on_error="skip").rows()


def test_missing_file(registry, tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope.jsonl' not found .*current directory"):
        load(registry, tmp_path / "nope.jsonl", schema="preference")
    with pytest.raises(DataError, match="no data file matches"):
        load(registry, tmp_path / "*.jsonl", schema="preference")


def test_unparsable_json_names_the_line(registry, tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps(PREFS[0]) + "\n" + '{"prompt": "p", "chosen": \n')
    with pytest.raises(DataError, match=r"p.jsonl line 2 is not valid JSON \(Expecting value"):
        load(registry, file, schema="preference").rows()
    dataset = load(registry, file, schema="preference", on_error="skip")  # a truncated last line
    assert len(dataset.rows()) == 1 and dataset.skipped == 1


def test_extra_config_key_is_rejected(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", PREFS)
    with pytest.raises(UserError, match="shuffle"):
        load(registry, file, schema="preference", shuffle=True)
    with pytest.raises(UserError, match="schema"):
        load(registry, file)


def test_every_schema_name_is_accepted():
    from typing import get_args

    from rlhfkit.plugins.datasets.schemas import SchemaName
    assert set(get_args(SchemaName)) == set(file_plugin.SCHEMAS)


def test_config_round_trips_with_the_schema_key():
    config = file_plugin.FileDatasetConfig.model_validate({"path": "p.jsonl", "schema": "text"})
    assert config.model_dump()["schema"] == "text"
    assert file_plugin.FileDatasetConfig.model_validate(config.model_dump()) == config


def test_nothing_is_written_next_to_the_data(registry, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", PREFS)
    pq.write_table(pa.Table.from_pylist(PREFS), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    before = listing(tmp_path)
    for name in ("p.jsonl", "p.parquet", "p.csv"):
        load(registry, tmp_path / name, schema="preference").rows()
    assert listing(tmp_path) == before


def test_limit_keeps_the_first_valid_rows(registry, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [PREFS[0], {"prompt": "bad"}, PREFS[1]])
    (tmp_path / "b.jsonl").write_text("not json at all")  # never read: the limit is reached
    dataset = load(registry, tmp_path / "*.jsonl", schema="preference", limit=2,
                   on_error="skip")
    assert [r.prompt for r in dataset.rows()] == ["Say hi.", "Count to two."]
    assert dataset.skipped == 1


def test_reading_is_deferred_and_cached(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", PREFS)
    dataset = load(registry, file, schema="preference")
    assert isinstance(dataset, rlhfkit.Dataset)
    first = dataset.rows()
    os.remove(file)
    assert dataset.rows() is first


# ----------------------------------------------------------------------- portions


def numbered(count: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
            for i in range(start, start + count)]


def prompts(dataset) -> list[str]:
    return [row.prompt for row in dataset.rows()]


@pytest.mark.parametrize("shuffle_seed", [None, 7])
@pytest.mark.parametrize("total", [3, 7, 13, 40, 101])
def test_adjacent_portions_split_the_rows_exactly(registry, tmp_path, total, shuffle_seed):
    # two files, so positions run across a file boundary
    write_jsonl(tmp_path / "a.jsonl", numbered(total // 3))
    pq.write_table(pa.Table.from_pylist(numbered(total - total // 3, total // 3)),
                   tmp_path / "b.parquet")
    everything = [f"p{i}" for i in range(total)]
    for bounds in ([0.0, 0.2, 0.6, 1.0], [0.0, 1 / 3, 2 / 3, 1.0], [0.0, 0.5, 1.0]):
        parts = []
        for start, end in pairwise(bounds):
            try:
                parts.append(prompts(load(registry, tmp_path / "*", schema="prompt",
                                          portion=[start, end], shuffle_seed=shuffle_seed)))
            except DataError as exc:  # a portion of too few rows may hold none
                assert "holds no row" in str(exc)
                parts.append([])
        joined = [prompt for part in parts for prompt in part]
        if shuffle_seed is None:
            assert joined == everything  # file order, nothing lost, nothing twice
        else:
            assert sorted(joined) == sorted(everything) and len(set(joined)) == total
        assert [len(part) for part in parts] == [
            round(end * total) - round(start * total) for start, end in pairwise(bounds)]


def test_portion_in_file_order(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", numbered(10))
    assert prompts(load(registry, file, schema="preference", portion=[0.2, 0.6])) == [
        "p2", "p3", "p4", "p5"]


def test_shuffle_seed_gives_one_order_per_seed(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", numbered(50))
    first = prompts(load(registry, file, schema="prompt", shuffle_seed=1))
    assert first == prompts(load(registry, file, schema="preference", shuffle_seed=1))
    assert first != prompts(load(registry, file, schema="prompt", shuffle_seed=2))
    assert sorted(first) == sorted(f"p{i}" for i in range(50)) and first != sorted(first)
    assert prompts(load(registry, file, schema="prompt", shuffle_seed=1,
                        portion=[0.0, 0.2])) == first[:10]


@pytest.mark.parametrize("portion", [[0.6, 0.2], [0.2, 0.2], [-0.1, 0.5], [0.5, 1.2]])
def test_portion_must_be_a_range_within_0_and_1(registry, tmp_path, portion):
    file = write_jsonl(tmp_path / "p.jsonl", PREFS)
    with pytest.raises(UserError, match=r"portion .* needs 0 <= start < end <= 1"):
        load(registry, file, schema="preference", portion=portion)


def test_portion_with_one_number_is_rejected(registry, tmp_path):
    with pytest.raises(UserError, match="portion"):
        load(registry, write_jsonl(tmp_path / "p.jsonl", PREFS), schema="preference",
             portion=[0.2])


def test_portions_count_every_row_whatever_the_schema(registry, tmp_path):
    # Row 1 lacks `rejected`: malformed as a preference, fine as a prompt. Boundaries are
    # counted on all rows, so stages with different schemas still get disjoint portions.
    records = numbered(10)
    del records[1]["rejected"]
    file = write_jsonl(tmp_path / "p.jsonl", records)
    pairs = load(registry, file, schema="preference", portion=[0.0, 0.5], on_error="skip")
    assert prompts(pairs) == ["p0", "p2", "p3", "p4"] and pairs.skipped == 1
    assert "line 2" in pairs.problems[0]
    assert prompts(load(registry, file, schema="prompt", portion=[0.0, 0.5])) == [
        "p0", "p1", "p2", "p3", "p4"]
    # rows outside the portion are not validated
    assert len(load(registry, file, schema="preference", portion=[0.5, 1.0]).rows()) == 5
    with pytest.raises(DataError, match="line 2: field 'rejected' is missing"):
        load(registry, file, schema="preference", portion=[0.0, 0.5]).rows()


def test_limit_keeps_the_first_valid_rows_of_the_portion(registry, tmp_path):
    records = numbered(10)
    records[5]["chosen"] = ""
    file = write_jsonl(tmp_path / "p.jsonl", records)
    assert prompts(load(registry, file, schema="preference", portion=[0.5, 1.0],
                        limit=2, on_error="skip")) == ["p6", "p7"]
    shuffled = prompts(load(registry, file, schema="prompt", shuffle_seed=3, portion=[0.5, 1.0]))
    assert prompts(load(registry, file, schema="prompt", shuffle_seed=3, portion=[0.5, 1.0],
                        limit=3)) == shuffled[:3]


def test_an_empty_portion_is_an_error(registry, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", numbered(3))
    with pytest.raises(DataError, match=r"portion \[0.0, 0.1\] of the 3 rows .* holds no row"):
        load(registry, file, schema="preference", portion=[0.0, 0.1]).rows()


def test_errors_in_a_portion_name_the_row_in_its_file(registry, tmp_path):
    records = numbered(10)
    records[7]["prompt"] = " "
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet row 7 \(0-based\): field 'prompt'"):
        load(registry, tmp_path / "p.parquet", schema="preference", shuffle_seed=0,
             portion=[0.0, 1.0]).rows()


def test_preference_with_an_implicit_prompt(registry, tmp_path):
    """TRL's implicit-prompt preference rows: the prompt is the texts' common beginning, cut
    at a word boundary; a row with nothing in common is an error naming the line."""
    file = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "Q: sky? The sky is blue.", "rejected": "Q: sky? The sky is green."},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
        {"chosen": "I like cats", "rejected": "I like cars"},
    ])
    rows = load(registry, file, schema="preference").rows()
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == [
        ("Q: sky? The sky is", " blue.", " green."), ("Say hi.", "Hi!", "Go away."), ("I like", " cats", " cars")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "blue", "rejected": "green"}])
    with pytest.raises(DataError, match="line 1.*do not begin with a common prompt"):
        load(registry, bad, schema="preference").rows()
