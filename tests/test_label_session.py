"""The labelling session on disk (rlhfkit.label.session), without the web server: what a
judgement writes, ties, flags, skips, undo, retries, each labeller's order, damaged files,
agreement by hand, and the rows read back by the reward-model stage's `file` dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli

import rlhfkit
from rlhfkit.errors import UserError
from rlhfkit.label.folder import Item, create_session
from rlhfkit.label.session import LabelRequestError, LabelSession
from rlhfkit.label.simulate import tiers_from_scores
from rlhfkit.label.sources import items_from_file
from rlhfkit.registry import ref

ITEMS = [Item(id=f"p{i}", prompt=f"prompt {i}", completions=(f"a{i}", f"b{i}", f"c{i}", f"d{i}")) for i in range(6)]


def session(tmp_path: Path, items: list[Item] = ITEMS) -> LabelSession:
    create_session(tmp_path / "s", items, seed=3)
    return LabelSession(tmp_path / "s")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_ranking_with_ties_and_flags_is_one_ranking_row_on_disk(tmp_path):
    s = session(tmp_path)
    receipt = s.submit("alice", "p2", [[3], [0, 2], [1]], {"1": ["harmful", "false"]}, "sub-00001", 4.25)
    assert receipt == {"saved": "sub-00001", "file": "rankings.jsonl", "duplicate": False,
                       "progress": {"done": 1, "total": 6, "skipped": 0, "ranked": 1}}
    (row,) = lines(tmp_path / "s" / "rankings.jsonl")
    assert row["prompt"] == "prompt 2" and row["completions"] == ["a2", "b2", "c2", "d2"]
    assert row["ranks"] == [1, 2, 1, 0]  # D > A = C > B, 0 = best
    assert row["flags"] == [[], ["harmful", "false"], [], []]
    assert row["labeller"] == "alice" and row["item"] == "p2" and row["id"] == "sub-00001"
    assert row["seconds"] == 4.25 and sorted(row["shown"]) == [0, 1, 2, 3] and row["time"].endswith("Z")


def test_skips_and_all_tied_go_to_unranked_and_count_as_done(tmp_path):
    s = session(tmp_path)
    s.skip("alice", "p0")
    s.submit("alice", "p1", [[0, 1, 2, 3]])  # "I can't tell them apart"
    assert not (tmp_path / "s" / "rankings.jsonl").exists()
    skipped, tied = lines(tmp_path / "s" / "unranked.jsonl")
    assert skipped["reason"] == "skip" and "ranks" not in skipped
    assert tied["reason"] == "tied" and tied["ranks"] == [0, 0, 0, 0]
    assert s.progress("alice") == {"done": 2, "total": 6, "skipped": 1, "ranked": 1}
    assert s.next_item("alice")["item"]["id"] not in ("p0", "p1")


def test_each_labeller_has_their_own_item_and_response_order_stable_across_restarts(tmp_path):
    s = session(tmp_path)
    alice = [i.id for i in s.order("alice")]
    bob = [i.id for i in s.order("bob")]
    assert sorted(alice) == sorted(bob) == [i.id for i in ITEMS] and alice != bob
    shown = [r["index"] for r in s.next_item("alice")["item"]["responses"]]
    again = LabelSession(tmp_path / "s")
    assert [i.id for i in again.order("alice")] == alice
    assert [r["index"] for r in again.next_item("alice")["item"]["responses"]] == shown
    # the next item follows the labeller's order, skipping what they judged
    s.submit("alice", alice[0], [[0], [1], [2], [3]])
    assert s.next_item("alice")["item"]["id"] == alice[1]
    assert s.next_item("bob")["item"]["id"] == bob[0]


def test_undo_removes_the_labellers_last_judgement_and_returns_it_for_editing(tmp_path):
    s = session(tmp_path)
    s.submit("alice", "p0", [[1], [0], [2, 3]], {"2": ["off-topic"]})
    s.submit("bob", "p0", [[0], [1], [2], [3]])
    s.skip("alice", "p1")
    undone = s.undo("alice")
    assert undone["item"]["id"] == "p1" and undone["item"]["previous"]["skipped"]
    undone = s.undo("alice")
    assert undone["item"]["id"] == "p0"
    assert undone["item"]["previous"]["tiers"] == [[1], [0], [2, 3]]
    assert undone["item"]["previous"]["flags"] == [[], [], ["off-topic"], []]
    assert [r["labeller"] for r in lines(tmp_path / "s" / "rankings.jsonl")] == ["bob"]
    assert lines(tmp_path / "s" / "unranked.jsonl") == []
    with pytest.raises(LabelRequestError, match="nothing to undo") as err:
        s.undo("alice")
    assert err.value.status == 409
    reopened = LabelSession(tmp_path / "s")  # what was undone stays undone
    assert reopened.progress("alice")["done"] == 0 and reopened.progress("bob")["done"] == 1


def test_a_retried_submission_is_saved_once_and_conflicts_are_refused(tmp_path):
    s = session(tmp_path)
    first = s.submit("alice", "p0", [[0], [1], [2], [3]], submission="retry-0001")
    again = s.submit("alice", "p0", [[0], [1], [2], [3]], submission="retry-0001")
    assert again["duplicate"] and again["saved"] == first["saved"]
    assert len(lines(tmp_path / "s" / "rankings.jsonl")) == 1
    with pytest.raises(LabelRequestError, match="already judged") as err:
        s.submit("alice", "p0", [[3], [2], [1], [0]])
    assert err.value.status == 409
    with pytest.raises(LabelRequestError, match="used for another"):
        s.submit("bob", "p1", [[0], [1], [2], [3]], submission="retry-0001")


@pytest.mark.parametrize(("call", "status", "message"), [
    (lambda s: s.submit("alice", "p0", [[0], [1], [2]]), 400, "exactly once"),
    (lambda s: s.submit("alice", "p0", [[0, 0], [1], [2], [3]]), 400, "exactly once"),
    (lambda s: s.submit("alice", "p0", [[0], [1], [2], [7]]), 400, "exactly once"),
    (lambda s: s.submit("alice", "p0", [[0], [1], [2], ["3"]]), 400, "exactly once"),
    (lambda s: s.submit("alice", "nope", [[0], [1], [2], [3]]), 404, "no item"),
    (lambda s: s.submit("alice", "p0", [[0], [1], [2], [3]], {"9": ["harmful"]}), 400, "indices are 0-3"),
    (lambda s: s.submit("alice", "p0", [[0], [1], [2], [3]], {"1": ["rude"]}), 400, "unknown flag"),
    (lambda s: s.submit("", "p0", [[0], [1], [2], [3]]), 400, "labeller name"),
    (lambda s: s.submit("<script>", "p0", [[0], [1], [2], [3]]), 400, "labeller name"),
    (lambda s: s.submit("alice", "p0", [[0], [1], [2], [3]], submission="x"), 400, "submission ids"),
    (lambda s: s.submit("alice", "p0", [[0], [1], [2], [3]], seconds=float("nan")), 400, "time spent"),
])
def test_bad_judgements_are_refused_with_a_status_and_nothing_is_written(tmp_path, call, status, message):
    s = session(tmp_path)
    with pytest.raises(LabelRequestError, match=message) as err:
        call(s)
    assert err.value.status == status
    assert not (tmp_path / "s" / "rankings.jsonl").exists()


def test_a_line_cut_short_by_a_kill_is_dropped_and_a_damaged_line_is_an_error(tmp_path):
    s = session(tmp_path)
    s.submit("alice", "p0", [[0], [1], [2], [3]])
    path = tmp_path / "s" / "rankings.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"prompt": "prompt 1", "compl')  # killed mid-write: never confirmed
    reader = LabelSession(tmp_path / "s")  # export, agreement: may see an append under way; skip it
    assert reader.progress("alice")["done"] == 1 and not reader.repaired and path.read_bytes() != whole
    writer = LabelSession(tmp_path / "s", lock=True)  # the server: cuts it off
    assert path.read_bytes() == whole and "unfinished last line" in writer.repaired[0]
    assert writer.progress("alice")["done"] == 1
    del writer
    path.write_bytes(b"not json\n" + whole)
    with pytest.raises(UserError, match=r"rankings.jsonl line 1 is not JSON"):
        LabelSession(tmp_path / "s")
    edited = json.loads(whole)
    del edited["ranks"]  # a hand-edited row the agreement view and undo could not use
    path.write_text(json.dumps(edited) + "\n")
    with pytest.raises(UserError, match=r"rankings.jsonl line 1 is not a judgement of this session"):
        LabelSession(tmp_path / "s")


def test_one_server_per_session(tmp_path):
    session(tmp_path)
    writer = LabelSession(tmp_path / "s", lock=True)
    with pytest.raises(UserError, match="open in another"):
        LabelSession(tmp_path / "s", lock=True)
    assert LabelSession(tmp_path / "s").progress("alice")["done"] == 0  # readers need no lock
    del writer


def test_agreement_by_hand(tmp_path):
    s = session(tmp_path)
    # p0: alice A>B>C>D, bob A>B=C>D   -> pairs AB AC AD BC BD CD: bob differs on BC only: 5/6
    s.submit("alice", "p0", [[0], [1], [2], [3]])
    s.submit("bob", "p0", [[0], [1, 2], [3]])
    # p1: alice D>C>B>A, bob A>B>C>D   -> every pair reversed: 0/6 (strict 0/6)
    s.submit("alice", "p1", [[3], [2], [1], [0]])
    s.submit("bob", "p1", [[0], [1], [2], [3]])
    s.skip("alice", "p2")  # skips are left out
    s.submit("bob", "p2", [[0], [1], [2], [3]])
    s.submit("carol", "p3", [[0], [1], [2], [3]])  # no item in common with anyone
    result = s.agreement()
    ab = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("alice", "bob"))
    assert ab["items"] == 2 and ab["pairs"] == 12
    assert ab["agreement"] == pytest.approx(5 / 12)
    assert ab["strict"] == pytest.approx(5 / 11)  # bob's B=C pair is not strict
    ac = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("alice", "carol"))
    assert ac["items"] == 0 and ac["agreement"] is None
    assert result["overall"] == pytest.approx(5 / 12)
    assert {lab["name"]: lab["ranked"] for lab in result["labellers"]} == {"alice": 2, "bob": 3, "carol": 1}


def test_the_rankings_file_is_read_by_the_reward_model_stages_file_dataset(tmp_path):
    s = session(tmp_path)
    s.submit("alice", "p0", [[2], [0, 1], [3]], {"3": ["harmful"]})
    s.submit("alice", "p1", [[0, 1, 2, 3]])  # all tied: not a ranking row
    s.submit("bob", "p0", [[0], [1], [2], [3]])
    registry = rlhfkit.load_plugins().registry
    dataset = registry.build(ref("dataset")(name="file", path=str(tmp_path / "s" / "rankings.jsonl"),
                                            schema="ranking"), None)
    rows = list(dataset.rows())
    assert [r.ranks for r in rows] == [(1, 1, 0, 2), (0, 1, 2, 3)]
    assert rows[0].prompt == "prompt 0" and rows[0].completions == ("a0", "b0", "c0", "d0")
    # export: a labeller's rows, rows with a flag left out
    out = tmp_path / "out.jsonl"
    result = cli("label", "export", str(tmp_path / "s"), str(out), "--drop-flag", "harmful")
    assert result.returncode == 0, result.stderr
    assert [r["labeller"] for r in lines(out)] == ["bob"]
    result = cli("label", "export", str(tmp_path / "s"), str(out), "--labeller", "alice")
    assert [r["ranks"] for r in lines(out)] == [[1, 1, 0, 2]]
    result = cli("label", "agreement", str(tmp_path / "s"))
    # p0: alice C > A = B > D, bob A > B > C > D: they agree on AD, BD, CD only
    assert result.returncode == 0 and "alice" in result.stdout and "50.0%" in result.stdout


def test_tiers_from_scores_ties_scores_equal_after_rounding():
    assert tiers_from_scores([5, 6, 7, 8], [0.1, 0.9, 0.12, -1.0], 0.25) == [[6], [5, 7], [8]]
    assert tiers_from_scores([0, 1, 2], [1.0, 2.0, 1.0]) == [[1], [0, 2]]


def test_items_from_a_samples_file_and_its_errors(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                "completions": ["a", {"role": "assistant", "content": "b"}]}) + "\n\n"
                    + json.dumps({"id": "x7", "prompt": "p", "responses": ["c", "d", "e"]}) + "\n")
    items = items_from_file(path)
    assert items[0] == Item(id="00001", prompt=[{"role": "user", "content": "hi"}], completions=("a", "b"))
    assert items[1] == Item(id="x7", prompt="p", completions=("c", "d", "e"))
    for row, message in [({"prompt": "p", "completions": ["only one"]}, "2-9 responses"),
                         ({"completions": ["a", "b"]}, "`prompt` is missing"),
                         ({"prompt": "p", "completions": ["a", 3]}, "every completion is text"),
                         ({"prompt": "p", "completions": ["a", " "]}, "a completion is empty"),
                         ({"prompt": "p", "completions": ["a"] * 10}, "2-9 responses")]:
        path.write_text(json.dumps({"prompt": "ok", "completions": ["a", "b"]}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(UserError, match=message) as err:
            items_from_file(path)
        assert "line 2" in str(err.value)


def test_cli_errors_say_what_to_do_and_exit_2(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    cases = [
        (["label", str(tmp_path / "none")], "not a labelling session yet"),
        (["label", str(tmp_path / "s"), "--samples", str(samples), "--from-stage", "x"], "not both"),
        (["label", str(tmp_path / "s"), "--samples", str(tmp_path / "missing.jsonl")], "no such file"),
        (["label", str(tmp_path / "s"), "--from-stage", str(tmp_path)], "needs --prompts"),
        (["label", str(tmp_path / "s"), "--from-stage", str(tmp_path), "--prompts", "{name: builtin}"],
         "has not finished"),
        (["label", str(tmp_path / "s"), "--samples", str(samples), "--flags", "Bad Flag"], "flags"),
        (["label", str(tmp_path / "s"), "--port", "99999"], "not a TCP port"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert cli("label", str(tmp_path / "s"), "--samples", str(samples), "--no-serve").returncode == 0
    again = cli("label", str(tmp_path / "s"), "--samples", str(samples), "--no-serve")
    assert again.returncode == 2 and "already holds a labelling session" in again.stderr
    exposed = cli("label", str(tmp_path / "s"), "--host", "0.0.0.0")
    assert exposed.returncode == 2 and "--token" in exposed.stderr
    helped = cli("label", "--help")
    assert helped.returncode == 0 and "--from-stage" in helped.stdout


def test_a_full_disk_leaves_no_partial_line_and_the_next_submission_works(tmp_path, monkeypatch):
    import errno
    import os

    from rlhfkit.rundir import is_disk_full

    s = session(tmp_path)
    s.submit("alice", "p0", [[0], [1], [2], [3]])
    path = tmp_path / "s" / "rankings.jsonl"
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if b'"labeller"' in bytes(data):  # the judgement's line: half of it lands, then the disk is full
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError) as err:
        s.submit("alice", "p1", [[0], [1], [2], [3]])
    monkeypatch.undo()
    assert is_disk_full(err.value)  # the server answers 507 "NOT saved" for it
    assert path.read_bytes() == before and s.progress("alice")["done"] == 1
    s.submit("alice", "p1", [[0], [1], [2], [3]])
    assert len(lines(path)) == 2 and len(LabelSession(tmp_path / "s").entries) == 2
