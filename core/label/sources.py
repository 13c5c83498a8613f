"""Where a session's items come from: a file of samples, or fresh samples of a stage's
exported model (K per prompt), drawn once when the session is created."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import UserError
from rlhfkit.files import decode_utf8
from rlhfkit.label.folder import MAX_COMPLETIONS, Item

MAX_TEXT = 20_000  # characters of one prompt or completion


@dataclass(frozen=True)
class SamplingSettings:
    k: int = 4
    items: int = 100
    max_new_tokens: int = 48
    max_prompt_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32


def items_from_file(path: Path, limit: int | None = None) -> list[Item]:
    """Items from a jsonl (or JSON list) file of rows ``{prompt, completions, id?}``:
    the prompt as text or as a list of ``{role, content}`` messages, 2-9 completions as
    text (``responses`` is read too). Rows are numbered in file order when they have no id."""
    if not path.is_file():
        raise UserError(f"--samples {path}: no such file; give a jsonl file of {{prompt, completions}} rows.")
    text = decode_utf8(path.read_bytes(), str(path))
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not JSON ({exc}).") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json samples file holds a list of rows.")
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} line {number}: not JSON ({exc.msg}); each line holds one row "
                                    f"{{prompt, completions}}.") from None
    return [_item(row, f"{path} line {number}", index)
            for index, (number, row) in enumerate(numbered[: limit or None], 1)]


def _item(row: Any, where: str, number: int) -> Item:
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row is a JSON object {{prompt, completions}}, got {type(row).__name__}.")
    prompt = row.get("prompt")
    completions = row.get("completions", row.get("responses"))
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                 and isinstance(m.get("content"), str) for m in prompt):
            raise UserError(f"{where}: `prompt` as a list must hold {{role, content}} messages.")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        size = sum(len(m["content"]) for m in prompt)
    elif isinstance(prompt, str):
        size = len(prompt)
    else:
        raise UserError(f"{where}: `prompt` is missing or not text / a list of messages.")
    if not isinstance(completions, list) or not 2 <= len(completions) <= MAX_COMPLETIONS:
        raise UserError(f"{where}: `completions` must be a list of 2-{MAX_COMPLETIONS} responses to rank.")
    texts = [c.get("content") if isinstance(c, dict) else c for c in completions]
    if not all(isinstance(t, str) for t in texts):
        raise UserError(f"{where}: every completion is text (or an assistant message with `content`).")
    if not all(t.strip() for t in texts):
        raise UserError(f"{where}: a completion is empty; the reward-model stage cannot read a ranking with an "
                        f"empty completion, so leave it out of the row.")
    if size > MAX_TEXT or any(len(t) > MAX_TEXT for t in texts):
        raise UserError(f"{where}: a prompt or completion is over {MAX_TEXT} characters; shorten it.")
    return Item(id=str(row.get("id", f"{number:05d}")), prompt=prompt, completions=tuple(texts))


def parse_dataset_reference(text: str) -> dict[str, Any]:
    """``--prompts``: a local file (any schema with a prompt; jsonl/json/parquet/csv) or
    a dataset reference in YAML flow form, e.g. ``{name: builtin, task: reviews, split: prompts}``."""
    if Path(text).is_file():
        return {"name": "file", "path": text, "schema": "prompt"}
    if len(text) > 2000:
        raise UserError("--prompts is too long for a dataset reference")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict) or "name" not in value:
        raise UserError(f"--prompts {text!r} is neither a file nor a dataset reference such as "
                        f"'{{name: builtin, task: reviews, split: prompts}}'.")
    return value


def items_from_stage(stage_dir: Path, prompts: dict[str, Any], settings: SamplingSettings,
                     plugins: Any) -> list[Item]:
    """``settings.k`` samples per prompt of the first ``settings.items`` prompts, from the
    model ``stage_dir`` (a finished stage) exported. A prompt left with fewer than 2
    non-empty responses (see :func:`_sample`) is left out."""
    import torch

    from rlhfkit.registry import ref
    from rlhfkit.rundir import read_json_file, verify_export

    done, why = read_json_file(stage_dir / "DONE.json")
    if done is None:
        raise UserError(f"--from-stage {stage_dir}: the stage has not finished (DONE.json {why}); run its recipe "
                        f"first, or point at a finished stage's folder (RUN_DIR/STAGE).")
    export = stage_dir / "export"
    problem = verify_export(export, done.get("export"))
    if problem:
        raise UserError(f"--from-stage {stage_dir}: its export is damaged ({problem}); re-run the stage.")
    policy = plugins.registry.build(ref("policy")(name="transformers", path=str(export)), None)
    dataset = plugins.registry.build(ref("dataset")(**prompts), None)
    rows = []
    for row in dataset.rows():
        if not hasattr(row, "prompt"):
            raise UserError(f"--prompts: its rows have no prompt ({type(row).__name__}).")
        rows.append(row.prompt)
        if len(rows) == settings.items:
            break
    if not rows:
        raise UserError("--prompts gave no prompt.")
    torch.manual_seed(settings.seed)
    policy.model.eval()
    items = []
    per_batch = max(1, settings.batch_size // settings.k)
    for start in range(0, len(rows), per_batch):
        chunk = rows[start:start + per_batch]
        texts = _sample(policy, [p for p in chunk for _ in range(settings.k)], settings)
        for j, prompt in enumerate(chunk):
            completions = [t for t in texts[j * settings.k:(j + 1) * settings.k] if t]
            if len(completions) >= 2:
                items.append(Item(id=f"{start + j:05d}", completions=tuple(completions),
                                  prompt=prompt if isinstance(prompt, str) else list(prompt)))
    return items


def _sample(policy: Any, prompts: list[Any], settings: SamplingSettings, redraws: int = 4) -> list[str]:
    """One response per prompt. An empty response is drawn again, up to ``redraws`` times
    (the `ranking` schema needs text in every completion); one still empty stays ""."""
    texts = [""] * len(prompts)
    todo = list(range(len(prompts)))
    for _ in range(1 + redraws):
        if not todo:
            break
        ids, mask = policy.tokenize_prompts([prompts[i] for i in todo])
        ids, mask = ids[:, -settings.max_prompt_length:], mask[:, -settings.max_prompt_length:]
        response, response_mask = policy.generate_ids(
            ids, mask, max_new_tokens=settings.max_new_tokens, do_sample=True,
            temperature=settings.temperature, top_p=settings.top_p)
        for i, text in zip(todo, policy.decode_responses(response, response_mask), strict=True):
            texts[i] = text.strip()
        todo = [i for i in todo if not texts[i]]
    return texts
