"""``rlhfkit label``: create a labelling session, serve its page, export and compare.

    rlhfkit label SESSION --samples FILE            a session over a file of samples, then serve it
    rlhfkit label SESSION --from-stage RUN/STAGE --prompts SPEC [--k 4 --items 100 ...]
    rlhfkit label SESSION                           serve an existing session (restarts where it was)
    rlhfkit label export SESSION OUT [--labeller NAME] [--drop-flag FLAG]
    rlhfkit label agreement SESSION
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhfkit.errors import UserError
from rlhfkit.files import atomic_write_text
from rlhfkit.label.folder import DEFAULT_FLAGS, SESSION_FILE, check_new_session, create_session
from rlhfkit.label.session import LabelSession

TOKEN_ENV = "RLHFKIT_LABEL_TOKEN"


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit label", description="Rank K responses per prompt in the browser (docs/human-feedback.md). "
        "Also: rlhfkit label export SESSION OUT; rlhfkit label agreement SESSION.")
    parser.add_argument("session", help="the session folder (created when --samples or --from-stage is given)")
    source = parser.add_argument_group("a new session's items (one of)")
    source.add_argument("--samples", metavar="FILE", help="jsonl of {prompt, completions: [2-9 texts], id?} rows")
    source.add_argument("--from-stage", metavar="RUN/STAGE", help="sample from a finished stage's exported model")
    sampling = parser.add_argument_group("sampling (--from-stage)")
    sampling.add_argument("--prompts", metavar="SPEC",
                          help="a prompts file, or a dataset reference: '{name: builtin, task: reviews, split: prompts}'")
    sampling.add_argument("--k", type=int, default=4, help="responses per prompt, 2-9 (default 4)")
    sampling.add_argument("--items", type=int, help="prompts to label (default: --from-stage 100, --samples all)")
    sampling.add_argument("--max-new-tokens", type=int, default=48)
    sampling.add_argument("--max-prompt-length", type=int, default=256)
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling, item and response order (default 0)")
    parser.add_argument("--flags", default=",".join(DEFAULT_FLAGS),
                        help=f"flags a labeller may put on a response (default {','.join(DEFAULT_FLAGS)})")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    server.add_argument("--port", type=int, default=8765, help="default 8765; 0 picks a free one")
    server.add_argument("--token", help=f"a shared secret every request must carry (also {TOKEN_ENV}); "
                                        f"required with a --host other than this machine")
    server.add_argument("--no-serve", action="store_true", help="create the session and stop")
    return parser


def main(argv: Sequence[str], console: Console) -> None:
    argv = list(argv)
    if argv[:1] == ["export"]:
        return export(argv[1:], console)
    if argv[:1] == ["agreement"]:
        return agreement(argv[1:], console)
    args = _serve_parser().parse_args(argv)
    directory = Path(args.session)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port; give 1-65535, or 0 for a free one.")
    if args.samples and args.from_stage:
        raise UserError("give one source of items: --samples FILE or --from-stage RUN/STAGE, not both.")
    if args.samples or args.from_stage:
        _create(args, directory, console)
    elif not (directory / SESSION_FILE).is_file():
        raise UserError(f"{directory} is not a labelling session yet; create it with --samples FILE or "
                        f"--from-stage RUN/STAGE --prompts SPEC.")
    if args.no_serve:
        return None
    from rlhfkit.label.server import serve

    serve(directory, args.host, args.port, args.token or os.environ.get(TOKEN_ENV) or None)
    return None


def _create(args: argparse.Namespace, directory: Path, console: Console) -> None:
    from rlhfkit.label.folder import MAX_COMPLETIONS, check_flags
    from rlhfkit.label.sources import (
        SamplingSettings,
        items_from_file,
        items_from_stage,
        parse_dataset_reference,
    )

    flags = check_flags(tuple(f.strip() for f in args.flags.split(",") if f.strip()))
    check_new_session(directory)  # before sampling, which can take a while
    if args.items is not None and args.items < 1:
        raise UserError("--items is at least 1.")
    if args.samples:
        items = items_from_file(Path(args.samples), args.items)
        source = {"samples": str(args.samples)}
    else:
        if not args.prompts:
            raise UserError("--from-stage needs --prompts: a prompts file or a dataset reference such as "
                            "'{name: builtin, task: reviews, split: prompts}'.")
        if not 2 <= args.k <= MAX_COMPLETIONS:
            raise UserError(f"--k is 2-{MAX_COMPLETIONS} responses per prompt.")
        from rlhfkit.plugin_manager import load_plugins

        settings = SamplingSettings(k=args.k, items=args.items or 100, max_new_tokens=args.max_new_tokens,
                                    max_prompt_length=args.max_prompt_length, temperature=args.temperature,
                                    top_p=args.top_p, seed=args.seed)
        prompts = parse_dataset_reference(args.prompts)
        items = items_from_stage(Path(args.from_stage), prompts, settings, load_plugins())
        source = {"from_stage": str(args.from_stage), "prompts": prompts, **settings.__dict__}
    create_session(directory, items, seed=args.seed, flags=flags, source=source)
    console.print(f"created the labelling session {directory}: {len(items)} items", highlight=False)


def export(argv: Sequence[str], console: Console) -> None:
    parser = argparse.ArgumentParser(prog="rlhfkit label export",
                                     description="Write a session's rankings (the `ranking` schema) to a jsonl file.")
    parser.add_argument("session")
    parser.add_argument("out", help="the jsonl file to write (replaced atomically)")
    parser.add_argument("--labeller", action="append", help="only this labeller's rankings (repeatable)")
    parser.add_argument("--drop-flag", action="append", default=[],
                        help="leave out rankings where a response carries this flag (repeatable)")
    args = parser.parse_args(argv)
    session = LabelSession(Path(args.session))
    unknown = [f for f in args.drop_flag if f not in session.flags]
    if unknown:
        raise UserError(f"--drop-flag {unknown}: this session's flags are {list(session.flags)}")
    rows = session.rankings(args.labeller, tuple(args.drop_flag))
    atomic_write_text(Path(args.out), "".join(json.dumps(row) + "\n" for row in rows))
    console.print(f"wrote {len(rows)} rankings to {args.out}; train on them with "
                  f"data: {{name: file, path: {args.out}, schema: ranking}}", highlight=False)


def agreement(argv: Sequence[str], console: Console) -> None:
    parser = argparse.ArgumentParser(prog="rlhfkit label agreement",
                                     description="Pairwise agreement between a session's labellers.")
    parser.add_argument("session")
    args = parser.parse_args(argv)
    result = LabelSession(Path(args.session)).agreement()
    table = Table(title=f"agreement between labellers, {args.session} (pairs of responses on items both ranked)")
    for column in ("labeller A", "labeller B", "items", "pairs", "agreement", "strict"):
        table.add_column(column)
    for pair in result["pairs"]:
        table.add_row(pair["a"], pair["b"], str(pair["items"]), str(pair["pairs"]),
                      _share(pair["agreement"]), _share(pair["strict"]))
    console.print(table)
    console.print("agreement: same verdict (better / worse / tied); strict: same direction where both "
                  "ranked strictly. Overall: " + _share(result["overall"]), highlight=False)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"
