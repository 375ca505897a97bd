"""``fedrlhf`` commands for a partner's annotators and admins.

label       serve the labeling page for a store (127.0.0.1 by default; token printed)
candidates  add candidate responses (imported or generated) and re-rank the queue
generate    samples from the base and a policy adapter, side by side
export      the store's comparisons as prompt/chosen/rejected JSONL
stats       counts per annotator, agreement, epsilon spent
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from client.label_queue import QueueSettings, agreement, annotator_counts, refresh_queue
from client.store import PreferenceStore
from common.config import RunConfig
from common.privacy import epsilon
from fedrlhf.hardware_options import add_hardware_options, model_config_of


def _label(args: argparse.Namespace) -> int:
    from client.labeling_app import LabelingServer

    server = LabelingServer(Path(args.store), args.host, args.port, args.token or "")
    print(f"labeling page for {args.store}: open {server.sign_in_url}", flush=True)
    print("(the token in that link is the key to the page; share it only with annotators)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _candidates(args: argparse.Namespace) -> int:
    from client.candidates import (
        GenerationSettings,
        RewardScorer,
        generate_candidates,
        read_candidates,
    )

    config = RunConfig()
    base = args.base or config.model.base
    with PreferenceStore(args.store) as store:
        for path in args.import_files or []:
            items = read_candidates(path)
            for prompt, responses in items:
                store.add_candidates(prompt, responses)
            print(f"{path}: {len(items)} prompts with candidates")
        if args.generate:
            settings = GenerationSettings(per_model=args.per_model, seed=args.seed)
            generated = generate_candidates(
                base, args.policy, store.prompts(), settings, model_config_of(args)
            )
            for prompt, responses in generated.items():
                store.add_candidates(prompt, responses)
            print(f"generated candidates for {len(generated)} prompts")
        scorer = (
            RewardScorer(base, args.reward, config.model.max_length, model_config_of(args))
            if args.reward
            else None
        )
        settings = QueueSettings(
            random_fraction=args.random_fraction,
            double_fraction=args.double_fraction,
            seed=args.seed,
        )
        queued = refresh_queue(store, scorer, settings)
    order = "least certain first" if scorer else "random order (no --reward model given)"
    print(f"queue: {queued} pairs awaiting labels, {order}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from client.candidates import GenerationSettings, sample_responses

    settings = GenerationSettings(
        per_model=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    samples = sample_responses(
        args.base or RunConfig().model.base,
        args.policy,
        args.prompt,
        settings,
        model_config_of(args),
    )
    table = Table(title="samples: reference (base) vs policy", show_lines=True)
    table.add_column("prompt")
    for variant in samples:
        table.add_column(variant)
    for prompt in args.prompt:
        table.add_row(prompt, *("\n---\n".join(samples[v][prompt]) for v in samples))
    Console().print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    with PreferenceStore(args.store) as store:
        rows = store.query(
            "SELECT p.text AS prompt, rc.text AS chosen, rr.text AS rejected, c.annotator,"
            " c.source, c.created_at FROM comparisons c JOIN prompts p ON p.id = c.prompt_id"
            " JOIN responses rc ON rc.id = c.chosen_id JOIN responses rr ON rr.id = c.rejected_id"
            " ORDER BY c.id"
        )
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
    try:
        for row in rows:
            out.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{len(rows)} comparisons written to {args.out}", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    delta = args.delta or RunConfig().privacy.delta
    with PreferenceStore(args.store) as store:
        report = {
            "counts": store.counts(),
            "labels_per_annotator": annotator_counts(store),
            "comparisons_per_annotator": {
                r["annotator"]: r["n"]
                for r in store.query(
                    "SELECT annotator, COUNT(*) AS n FROM comparisons GROUP BY annotator"
                )
            },
            "annotator_agreement": agreement(store),
            "epsilon_spent": epsilon(store.privacy_events(), delta),
            "delta": delta,
        }
    print(json.dumps(report, indent=2))
    return 0


def add_label_commands(sub: argparse._SubParsersAction) -> None:
    label = sub.add_parser("label", help="serve the labeling page for a store")
    label.add_argument("--store", required=True)
    label.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    label.add_argument("--port", type=int, default=8377)
    label.add_argument("--token", help="access token (default: a new random one)")
    label.set_defaults(func=_label)

    cand = sub.add_parser("candidates", help="add candidate responses and re-rank the queue")
    cand.add_argument("--store", required=True)
    cand.add_argument(
        "--import",
        dest="import_files",
        action="append",
        metavar="FILE.jsonl",
        help='lines {"prompt": ..., "responses": [...]} (repeatable)',
    )
    cand.add_argument(
        "--generate", action="store_true", help="sample responses for the store's prompts"
    )
    cand.add_argument("--base", help="base model (default: the run config's model.base)")
    cand.add_argument("--policy", help="global policy adapter directory (PEFT layout)")
    cand.add_argument("--per-model", type=int, default=2, help="samples per prompt and model")
    cand.add_argument(
        "--reward", help="global reward adapter directory (checkpoint's reward/) to rank pairs"
    )
    cand.add_argument("--random-fraction", type=float, default=QueueSettings.random_fraction)
    cand.add_argument("--double-fraction", type=float, default=QueueSettings.double_fraction)
    cand.add_argument("--seed", type=int, default=0)
    add_hardware_options(cand)
    cand.set_defaults(func=_candidates)

    gen = sub.add_parser("generate", help="samples from the base and a policy adapter side by side")
    gen.add_argument("--base", help="base model (default: the run config's model.base)")
    gen.add_argument("--policy", help="policy adapter directory (PEFT layout)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--samples", type=int, default=2, help="samples per prompt and model")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    add_hardware_options(gen)
    gen.set_defaults(func=_generate)

    export = sub.add_parser("export", help="comparisons as prompt/chosen/rejected JSONL")
    export.add_argument("--store", required=True)
    export.add_argument("--out", required=True, help="JSONL file, or - for standard output")
    export.set_defaults(func=_export)

    stats = sub.add_parser("stats", help="labels per annotator, agreement, epsilon spent")
    stats.add_argument("--store", required=True)
    stats.add_argument("--delta", type=float, help="delta for epsilon (default: run default)")
    stats.set_defaults(func=_stats)
