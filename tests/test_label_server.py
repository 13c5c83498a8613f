"""The labelling server over HTTP: bad requests, the token, concurrent labellers, kills at
random moments, and the loop closed: sample from a stage, rank with the gold scorer through
the page's API, train a reward model and PPO on the rankings (recipes/human-feedback/)."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import uuid

import pytest
from helpers import REPO, cli
from label_server import SAMPLE_ROWS, Server, new_session

import rlhfkit
from rlhfkit.label.simulate import LabelAPIError, LabelClient, rank_session
from rlhfkit.recipe import compose
from rlhfkit.registry import ref
from rlhfkit.runner import run_recipe


def raw(server: Server, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data.startswith(b"{") else {"raw": data}, dict(response.getheaders())


JSON = {"Content-Type": "application/json"}
GOOD = {"labeller": "alice", "item": "00001", "tiers": [[0], [1], [2], [3]]}


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "message"), [
    ("POST", "/api/submit", b"{not json", JSON, 400, "not valid JSON"),
    ("POST", "/api/submit", json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}, 415, "as JSON"),
    ("POST", "/api/submit", json.dumps({"labeller": "alice"}).encode(), JSON, 400, "item: Field required"),
    ("POST", "/api/submit", json.dumps(GOOD | {"tiers": "best"}).encode(), JSON, 400, "tiers"),
    ("POST", "/api/submit", json.dumps(GOOD | {"tiers": [["0"], [1], [2], [3]]}).encode(), JSON, 400, "integer"),
    ("POST", "/api/submit", json.dumps(GOOD | {"extra": 1}).encode(), JSON, 400, "extra"),
    ("POST", "/api/submit", json.dumps(GOOD | {"item": "nope"}).encode(), JSON, 404, "no item"),
    ("POST", "/api/submit", json.dumps(GOOD | {"tiers": [[0], [1]]}).encode(), JSON, 400, "exactly once"),
    ("POST", "/api/submit", json.dumps(GOOD | {"labeller": "../../etc"}).encode(), JSON, 400, "labeller name"),
    ("POST", "/api/submit", json.dumps(GOOD | {"flags": {"0": ["nice"]}}).encode(), JSON, 400, "unknown flag"),
    ("POST", "/api/submit", b"[" * 2_000_000, JSON, 413, "at most"),
    ("POST", "/api/undo", json.dumps({"labeller": "nobody"}).encode(), JSON, 409, "nothing to undo"),
    ("GET", "/api/next", None, {}, 400, "labeller name"),
    ("GET", "/api/next?labeller=%00", None, {}, 400, "labeller name"),
    ("GET", "/nothing/here", None, {}, 404, "no such page"),
    ("GET", "/static/..%2Fsession.py", None, {}, 404, "no"),
    ("DELETE", "/api/submit", None, {}, 405, "Method Not Allowed"),
    ("GET", "/api/agreement", None, {"Host": "rebound.example:8765"}, 421, "answers only at 127.0.0.1"),
])
def test_bad_requests_get_a_4xx_with_a_message_never_a_traceback(tmp_path, method, path, body, headers,
                                                                 status, message):
    with Server(new_session(tmp_path)) as server:
        got, data, _ = raw(server, method, path, body, headers)
        assert got == status, data
        assert message in data["error"] and "Traceback" not in data["error"]
        assert not (tmp_path / "session" / "rankings.jsonl").exists()
        assert server.client().next("alice")["progress"]["done"] == 0  # still serving


def test_the_page_and_its_files_are_served_with_safe_headers(tmp_path):
    with Server(new_session(tmp_path)) as server:
        for path, kind in [("/", "text/html"), ("/agreement", "text/html"), ("/static/label.js", "text/javascript"),
                           ("/static/label.css", "text/css"), ("/static/agreement.js", "text/javascript")]:
            status, _, headers = raw(server, "GET", path)
            assert status == 200 and headers["content-type"].startswith(kind)
            assert headers["content-security-policy"].startswith("default-src 'self'")
            assert headers["x-content-type-options"] == "nosniff"


def test_a_token_guards_every_request_and_the_link_sets_a_cookie(tmp_path):
    with Server(new_session(tmp_path), token="s3cret-token") as server:
        status, data, _ = raw(server, "GET", "/api/next?labeller=alice")
        assert status == 401 and "token" in data["error"]
        assert raw(server, "GET", "/", headers={"X-Label-Token": "wrong"})[0] == 401
        assert server.client().next("alice")["item"] is not None  # the client sends X-Label-Token
        status, _, headers = raw(server, "GET", "/?token=s3cret-token")
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"].split(";")[0]
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
        assert raw(server, "GET", "/api/next?labeller=alice", headers={"Cookie": cookie})[0] == 200


def test_concurrent_labellers_never_overwrite_each_other(tmp_path):
    with Server(new_session(tmp_path)) as server:
        errors: list[BaseException] = []

        def label(name: str) -> None:
            try:
                client = server.client()
                # two threads per name: the second one's submissions of the same item are refused (409)
                while (item := client.next(name)["item"]) is not None:
                    order = [r["index"] for r in item["responses"]]
                    try:
                        client.submit(name, item["id"], [order[:2], order[2:]])
                    except LabelAPIError as exc:
                        assert exc.status == 409, exc
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=label, args=(f"labeller-{i % 4}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
    rows = [json.loads(line) for line in (tmp_path / "session" / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(SAMPLE_ROWS)
    assert len({(r["labeller"], r["item"]) for r in rows}) == len(rows)
    assert all(sorted(r["ranks"]) == [0, 0, 1, 1] for r in rows)


def test_killing_the_server_at_random_moments_loses_no_confirmed_submission(tmp_path):
    """500 submissions (100 items x 5 labellers) while the server is killed with SIGKILL at
    random moments and restarted; a submission whose reply was lost is sent again with the
    same id, as the page does."""
    rows = [{"prompt": f"prompt {i}", "completions": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(100)]
    server = Server(new_session(tmp_path, rows)).start()
    confirmed: dict[str, tuple[str, str]] = {}
    finished = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        chance = random.Random(0)
        while not finished.is_set():
            time.sleep(chance.uniform(0.05, 0.5))
            if finished.is_set():
                break
            server.kill()
            kills += 1
            server.start()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        client = LabelClient(server.url, timeout=5)
        for name in [f"l{i}" for i in range(5)]:
            while True:
                try:
                    item = client.next(name)["item"]
                except (OSError, http.client.HTTPException):
                    time.sleep(0.02)
                    continue
                if item is None:
                    break
                submission = uuid.uuid4().hex
                tiers = [[r["index"]] for r in item["responses"]]
                while True:  # until confirmed: the same id each time
                    try:
                        receipt = client.submit(name, item["id"], tiers, submission=submission)
                        break
                    except (OSError, http.client.HTTPException):
                        time.sleep(0.02)
                confirmed[receipt["saved"]] = (name, item["id"])
    finally:
        finished.set()
        thread.join()
        server.kill()
    assert len(confirmed) == 500 and kills >= 5, (len(confirmed), kills)
    saved = [json.loads(line) for line in (tmp_path / "session" / "rankings.jsonl").read_text().splitlines()]
    assert {r["id"]: (r["labeller"], r["item"]) for r in saved} == confirmed  # all there, nothing twice
    assert len(saved) == 500


def test_the_loop_sample_from_a_stage_rank_with_gold_train_a_reward_model_and_ppo(tmp_path, exports):
    """rlhfkit label --from-stage samples K responses per prompt from an exported model;
    the gold scorer ranks them through the HTTP API; recipes/human-feedback/round.yaml
    trains a reward model on the session's rankings, PPO against it, and reports."""
    stage = exports["sft"].parent
    session = tmp_path / "labels" / "round-1"
    result = cli("label", str(session), "--from-stage", str(stage), "--k", "3", "--items", "12",
                 "--prompts", "{name: builtin, task: reviews, split: prompts}", "--max-new-tokens", "10",
                 "--no-serve")
    assert result.returncode == 0, result.stderr
    items = [json.loads(line) for line in (session / "items.jsonl").read_text().splitlines()]
    assert len(items) == 12 and all(len(i["completions"]) == 3 for i in items)
    gold = rlhfkit.load_plugins().registry.build(ref("reward")(name="gold", task="reviews"), None)
    with Server(session) as server:
        ranked = rank_session(server.client(), "gold", lambda p, r: gold.score(p, r).tolist(), tie_precision=0.25)
    assert ranked == 12
    rows = [json.loads(line) for line in (session / "rankings.jsonl").read_text().splitlines()]
    for row in rows:  # the ranks follow the gold scores
        scores = gold.score([row["prompt"]] * 3, row["completions"]).tolist()
        for i in range(3):
            for j in range(3):
                if row["ranks"][i] < row["ranks"][j]:
                    assert scores[i] > scores[j]
    recipe_path = REPO / "recipes" / "human-feedback" / "round.yaml"
    plugins = rlhfkit.load_plugins()
    data, _ = compose(recipe_path, plugins.presets)
    sft = str(exports["sft"])
    overrides = [f"run.dir={tmp_path / 'run'}", f"stages.rm.backbone.path={sft}",
                 f"stages.rm.data.path={tmp_path / 'labels'}/*/rankings.jsonl", f"stages.ppo.policy.path={sft}",
                 f"stages.report.models.0.path={sft}", f"stages.report.reference.path={sft}",
                 "stages.rm.eval_data.limit=16", "stages.rm.reference_data.limit=16",
                 "stages.report.algorithm.prompts=4", "stages.report.algorithm.max_new_tokens=6",
                 "stages.report.pairs.limit=8", "stages.ppo.algorithm.prompts_per_iteration=4",
                 "stages.ppo.algorithm.epochs=1", "stages.ppo.algorithm.sampling.max_new_tokens=6",
                 "stages.ppo.algorithm.eval_prompts=4"]
    for name in data["stages"]:
        overrides += [f"stages.{name}.trainer.max_steps=2", f"stages.{name}.trainer.batch_size=4",
                      f"stages.{name}.trainer.micro_batch_size=4"]
    summaries = run_recipe(plugins.load_recipe(recipe_path, overrides), plugins)
    assert summaries["rm"]["steps"] == 2 and summaries["ppo"]["steps"] == 2
    assert (tmp_path / "run" / "report" / "report.json").is_file()
