"""``optimum-superweight card`` and ``optimum-superweight push``: read super weights from cards, push checkpoints.

    optimum-superweight card user/SmolLM2-135M-Instruct-sw4          # coordinates from a Hub card
    optimum-superweight card path/to/README.md --json                # ... from a file, as JSON
    optimum-superweight card --known mistralai/Mistral-7B-Instruct-v0.1   # from the shipped index
    optimum-superweight card --list-known
    optimum-superweight card out/smollm2-sw4 --generate --base-model HuggingFaceTB/SmolLM2-135M-Instruct
    optimum-superweight push out/smollm2-sw4 user/SmolLM2-135M-Instruct-sw4 --ppl-before PPL_FULL --ppl-after PPL_QUANTIZED
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register", "run_card", "run_push"]


def register(subparsers: argparse._SubParsersAction) -> None:
    card = subparsers.add_parser(
        "card",
        help="read super-weight coordinates from a model card (Hub repo, folder, README) or the index; or generate a card",
        description="Print the super weights a model card records: its YAML block, a quantized checkpoint's "
        "config.json, or coordinates in the paper's notation in its text (layers[2].mlp.down_proj.weight[3968, 7003]).",
    )
    card.add_argument("source", nargs="?", help="Hub repo id, local model folder, or README path")
    card.add_argument("--known", metavar="MODEL_ID", help="look MODEL_ID up in the shipped index of known super weights")
    card.add_argument("--list-known", action="store_true", help="list the models of the index")
    card.add_argument("--json", action="store_true", help="print JSON (a list of super-weight records)")
    card.add_argument("--revision", help="Hub revision (for a repo id)")
    card.add_argument("--token", help="Hub token (default: the saved login)")
    card.add_argument("--generate", action="store_true",
                      help="SOURCE is a quantized checkpoint folder: print (or write with -o) its generated card")
    card.add_argument("-o", "--output", help="with --generate: write the card to this file instead of printing it")
    card.add_argument("--overwrite", action="store_true", help="with -o: replace an existing file")
    _add_card_fields(card)
    card.set_defaults(func=run_card)

    push = subparsers.add_parser(
        "push",
        help="upload a quantized checkpoint folder with its super-weight model card (one commit)",
        description="Upload a folder written by save_pretrained from an optimum-superweight model, with a generated "
        "README.md that records the super weights, in a single commit. Everything is validated first.",
    )
    push.add_argument("folder", help="local quantized checkpoint folder (save_pretrained output)")
    push.add_argument("repo_id", help="target Hub repo, 'namespace/name'")
    push.add_argument("--token", help="Hub token (default: the saved login)")
    push.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument("--dry-run", action="store_true", help="validate and print the card and files; upload nothing")
    _add_card_fields(push)
    push.set_defaults(func=run_push)


def _add_card_fields(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("card fields")
    group.add_argument("--base-model", help="Hub id of the full-precision model")
    group.add_argument("--repo-id", dest="card_repo_id", help=argparse.SUPPRESS)
    group.add_argument("--ppl-before", type=float, help="perplexity of the full-precision model")
    group.add_argument("--ppl-after", type=float, help="perplexity of the quantized model")
    group.add_argument("--ppl-text", help="what the perplexity was measured on (one line)")
    group.add_argument("--ppl-tokens", type=int, help="number of tokens scored")
    group.add_argument("--license", help="license id for the card metadata, e.g. apache-2.0")
    group.add_argument("--tag", action="append", default=[], help="extra Hub tag (repeatable)")


def _perplexity(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.ppl_after is None:
        if args.ppl_before is not None or args.ppl_text or args.ppl_tokens:
            raise ValueError("--ppl-before/--ppl-text/--ppl-tokens need --ppl-after (the quantized model's perplexity).")
        return None
    values = {"before": args.ppl_before, "after": args.ppl_after, "text": args.ppl_text, "tokens": args.ppl_tokens}
    return {k: v for k, v in values.items() if v is not None}


def _print_records(records: list, as_json: bool, header: str | None = None) -> None:
    if as_json:
        print(json.dumps([sw.to_dict() for sw in records], indent=2))
        return
    if header:
        print(header)
    if not records:
        print("(no super weights)")
    for sw in records:
        details = [f"value={sw.value:.6g}" if sw.value is not None else None,
                   f"class={sw.classification}" if sw.classification else None,
                   f"impact={sw.impact:.4g}" if sw.impact is not None else None]
        extra = "  ".join(d for d in details if d)
        print(f"{sw.paper_notation()}  module={sw.module}  row={sw.row}  col={sw.col}" + (f"  {extra}" if extra else ""))


def run_card(args: argparse.Namespace) -> int:
    from ..hub.index import find_known_model, known_models

    if args.list_known:
        for entry in known_models():
            variants = f" (also {', '.join(entry.variants)})" if entry.variants else ""
            print(f"{entry.model_id}{variants}: {len(entry.super_weights)} super weight(s); source: {entry.source}")
        return 0
    if args.known:
        entry = find_known_model(args.known)
        if entry is None:
            from ..hub.index import known_super_weights

            known_super_weights(args.known)  # raises the ValueError that lists the index
        _print_records(list(entry.super_weights), args.json,
                       f"{entry.model_id} — source: {entry.source}; card: {entry.card}")
        return 0
    if not args.source:
        raise ValueError("card needs a SOURCE (Hub repo id, folder or README path), --known MODEL_ID or --list-known.")
    if args.output and not args.generate:
        raise ValueError("-o/--output writes a generated card: add --generate (SOURCE is then a quantized checkpoint folder).")
    if args.generate:
        from ..hub.push import card_for_folder
        from .paths import check_output_file

        check_output_file(args.output, args.overwrite, "-o/--output")

        card = card_for_folder(
            args.source, repo_id=args.card_repo_id, base_model=args.base_model, perplexity=_perplexity(args),
            license=args.license, tags=args.tag,
        )
        if args.output:
            card.save(args.output)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            print(str(card))
        return 0
    from ..hub.reading import read_super_weights

    records = read_super_weights(args.source, revision=args.revision, token=args.token)
    _print_records(records, args.json, None)
    return 0


def run_push(args: argparse.Namespace) -> int:
    from ..hub.push import DEFAULT_COMMIT_MESSAGE, card_for_folder, push_folder_to_hub

    perplexity = _perplexity(args)
    if args.dry_run:
        from pathlib import Path

        card = card_for_folder(args.folder, repo_id=args.repo_id, base_model=args.base_model, perplexity=perplexity,
                               license=args.license, tags=args.tag)
        print(str(card))
        files = sorted(p.relative_to(args.folder).as_posix() for p in Path(args.folder).rglob("*") if p.is_file())
        print(f"dry run: would upload {', '.join(f for f in files if f != 'README.md')} and README.md to {args.repo_id}",
              file=sys.stderr)
        return 0
    info = push_folder_to_hub(
        args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
        commit_message=args.message or DEFAULT_COMMIT_MESSAGE, base_model=args.base_model, perplexity=perplexity,
        license=args.license, tags=args.tag,
    )
    print(f"pushed {args.folder} to {args.repo_id}: {info.commit_url}")
    return 0
