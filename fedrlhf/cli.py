"""The ``fedrlhf`` command line.

fedrlhf simulate [--out DIR] [--orgs N] [--set KEY=VALUE ...]
    [--data FILE ... [--partition iid|dirichlet:ALPHA|by:FIELD] [--test FILE]]
fedrlhf evaluate --reward DIR --data FILE | --policy DIR --prompts FILE [--reward DIR]
fedrlhf import --store PATH FILE [...]   (JSONL, JSON, Parquet, CSV, save_to_disk folders)
fedrlhf store-info --store PATH
fedrlhf privacy-report --store PATH [--delta D] [--json]   (every charge, epsilon by RDP and PRV)
fedrlhf demo-data [--english] --org N --out FILE.jsonl
fedrlhf labeling-study [--out DIR]   (uncertainty-first vs random labeling, simulated)
fedrlhf label | candidates | export | stats   (a partner's annotators; see label_commands.py)
fedrlhf create-ca | create-node-key | superlink | register-node | supernode | launch
    (a real deployment; see fedrlhf/deploy_commands.py and the README)
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

from client.importers import ImportFileError, import_file, import_prompts
from client.store import PreferenceStore, StoreError
from common.config import ConfigError, RunConfig
from common.operator_logging import configure_operator_logging
from common.privacy import epsilon
from fedrlhf.base_commands import add_base_command
from fedrlhf.deploy_commands import add_deployment_commands
from fedrlhf.evaluate_commands import add_evaluate_command
from fedrlhf.label_commands import add_label_commands
from simulations.partitions import PartitionError


def _parse_override(text: str) -> tuple[str, bool | int | float | str]:
    """``key=value`` with a TOML value (strings may be left unquoted)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _simulate(args: argparse.Namespace) -> int:
    from simulations.runner import SimulationOptions, run_simulation
    from simulations.user_data import DataOptions
    from simulations.world import WorldConfig

    overrides = dict(args.set or [])
    RunConfig().replace(**overrides)  # refuse unknown keys before any work
    world = WorldConfig()
    data = None
    if args.data:
        data = DataOptions(
            files=tuple(Path(p) for p in args.data),
            partition=args.partition,
            partition_by=args.partition_by,
            organizations=args.orgs,
            test=Path(args.test) if args.test else None,
            test_fraction=args.test_fraction,
            seed=int(overrides.get("seed", 0)),
        )
    elif args.partition or args.test or args.partition_by:
        raise ConfigError("--partition, --partition-by and --test need --data")
    else:
        if args.orgs:
            world = replace(world, organizations=args.orgs)
        if args.comparisons:
            world = replace(world, comparisons_per_org=args.comparisons)
    options = SimulationOptions(
        out_dir=Path(args.out),
        world=world,
        data=data,
        overrides=overrides,
        baselines=not args.no_baselines,
        compare_objectives=args.compare_objectives,
    )
    if args.cache:
        options.cache_dir = Path(args.cache)
    report = run_simulation(options)
    checks = {**report["checks"], **((report.get("policy") or {}).get("checks", {}))}
    return 0 if all(checks.values()) or not args.strict else 1


def _import(args: argparse.Namespace) -> int:
    with PreferenceStore(args.store) as store:
        for path in args.files:
            report = import_file(store, path, annotator=args.annotator)
            print(
                f"{path}: {report.comparisons} comparisons, {report.added} added, {report.duplicates} already present"
            )
    return 0


def _import_prompts(args: argparse.Namespace) -> int:
    with PreferenceStore(args.store) as store:
        for path in args.files:
            read, added = import_prompts(store, path)
            print(f"{path}: {read} prompts, {added} added, {read - added} already present")
        print(f"{args.store}: {store.counts()['prompts']} prompts in the pool")
    return 0


def _labeling_study(args: argparse.Namespace) -> int:
    from simulations.labeling_study import StudyConfig, run_study

    study = replace(
        StudyConfig(), repeats=args.repeats, budget=args.budget, batch=args.batch, pool=args.pool
    )
    report = run_study(Path(args.out), study)
    for campaign, rows in report["labels_needed_for_random_accuracy_at_n"].items():
        print(f"{campaign}: labels needed for the accuracy random selection reaches with")
        for row in rows:
            needed = row["labels_needed"]
            print(
                f"  {row['random_labels']:5d} labels (accuracy {row['accuracy']:.4f}): "
                + (f"{needed:.0f} ({needed / row['random_labels'] - 1:+.0%})" if needed else "-")
            )
    print(f"report: {Path(args.out) / 'labeling_study.json'}, plot: labeling_study.png")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    if args.english:
        return _english_demo_data(args)
    from simulations.world import World, WorldConfig

    world = World(replace(WorldConfig(), organizations=max(args.org + 1, 2)))
    out = Path(args.out)
    with out.open("w", encoding="utf-8") as f:
        for prompt, chosen, rejected in world.local_comparisons(args.org)[: args.comparisons]:
            line = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps({**line, "annotator": f"demo-{args.org}"}) + "\n")
    print(f"{out}: {min(args.comparisons, world.config.comparisons_per_org)} comparisons")
    return 0


def _english_demo_data(args: argparse.Namespace) -> int:
    from simulations.english_preferences import (
        EnglishPreferences,
        EnglishPreferencesConfig,
        bayes_ceiling,
    )

    config = replace(
        EnglishPreferencesConfig(),
        organizations=max(args.org + 1, args.orgs),
        comparisons_per_org=args.comparisons,
        seed=args.seed,
    )
    data = EnglishPreferences(config)
    rows = data.test_rows() if args.test else data.organization_rows(args.org)
    out = Path(args.out)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    what = "test comparisons (all organizations)" if args.test else f"comparisons of org-{args.org}"
    print(f"{out}: {len(rows)} {what}; Bayes ceiling {bayes_ceiling(rows):.3f}")
    return 0


def _store_info(args: argparse.Namespace) -> int:
    config = RunConfig()
    with PreferenceStore(args.store) as store:
        info = store.counts()
        info["epsilon_spent"] = epsilon(store.privacy_events(), args.delta or config.privacy.delta)
        info["delta"] = args.delta or config.privacy.delta
    print(json.dumps(info, indent=2))
    return 0


def _privacy_report(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from client.privacy_report import ACCOUNTANTS, privacy_report

    with PreferenceStore(args.store) as store:
        report = privacy_report(store, args.delta or RunConfig().privacy.delta)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = Console()
    charges = Table(title=f"Mechanisms charged in {report['store']}")
    for column in ("id", "run", "phase", "round", "mechanism", "unit", "noise", "rate", "steps"):
        charges.add_column(column, justify="right" if column in ("noise", "rate") else "left")
    charges.add_column("status / randomness")
    for m in report["mechanisms"]:
        charges.add_row(
            str(m["id"]), m["run_id"][:8], m["phase"], str(m["round"]), m["mechanism"],
            m["unit"], f"{m['noise_multiplier']:.4g}", f"{m['sample_rate']:.4g}",
            str(m["steps"]), f"{m['status']} / {m['randomness']}",
        )  # fmt: skip
    console.print(charges)
    composed = Table(title=f"Composed epsilon at delta {report['delta']:g}")
    composed.add_column("mechanisms composed")
    composed.add_column("count", justify="right")
    for kind in ACCOUNTANTS:
        composed.add_column(f"epsilon ({kind.upper()})", justify="right")
    for c in report["compositions"]:
        composed.add_row(
            c["subset"], str(c["mechanisms"]), *(f"{c['epsilon'][k]:.3f}" for k in ACCOUNTANTS)
        )
    console.print(composed)
    console.print(
        "'all' is the guarantee for one comparison and what the budget caps (RDP unless "
        "privacy.accountant says otherwise); PRV is Opacus's upper bound from the "
        "privacy-loss distribution. Pending charges are counted in full."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrlhf", description="Federated, privacy-preserving RLHF."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate", help="run the whole federation on this machine and write a report"
    )
    sim.add_argument(
        "--out", default="runs/simulation", help="run directory (report, plots, checkpoints)"
    )
    sim.add_argument("--orgs", type=int, help="number of simulated organizations")
    sim.add_argument(
        "--comparisons", type=int, help="comparisons per organization (synthetic world)"
    )
    sim.add_argument(
        "--data",
        action="append",
        metavar="FILE",
        help="your own preference data instead of the synthetic world: one file (JSONL, "
        "JSON, Parquet, CSV or save_to_disk folder) per organization, or one to --partition "
        "(repeatable)",
    )
    sim.add_argument(
        "--partition",
        metavar="SPEC",
        help="split one --data set into --orgs organizations: iid, dirichlet:ALPHA (with "
        "--partition-by FIELD), or by:FIELD (one organization per value of FIELD)",
    )
    sim.add_argument("--partition-by", metavar="FIELD", help="the column dirichlet:ALPHA skews")
    sim.add_argument("--test", metavar="FILE", help="labeled test comparisons no one trains on")
    sim.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="without --test, the share of the data held out as the test set (default 0.1)",
    )
    sim.add_argument(
        "--set",
        action="append",
        type=_parse_override,
        metavar="KEY=VALUE",
        help="run-config override, e.g. --set reward.rounds=5 (repeatable)",
    )
    sim.add_argument(
        "--cache", help="where the pretrained tiny base is cached (default ~/.cache/fedrlhf)"
    )
    sim.add_argument(
        "--no-baselines", action="store_true", help="skip the centralized and single-org baselines"
    )
    sim.add_argument(
        "--compare-objectives",
        action="store_true",
        help="also run every other policy method (DPO, PPO, RLOO, GRPO) on the same world and budget",
    )
    sim.add_argument("--strict", action="store_true", help="exit 1 if any target check fails")
    sim.set_defaults(func=_simulate)

    imp = sub.add_parser("import", help="import preference comparisons (JSONL) into a local store")
    imp.add_argument(
        "--store", required=True, help="the organization's SQLite store (created if missing)"
    )
    imp.add_argument(
        "--annotator", default="import", help="annotator recorded when a line names none"
    )
    imp.add_argument(
        "files",
        nargs="+",
        help="prompt/chosen/rejected or Anthropic-HH chosen/rejected rows: JSONL, JSON, "
        "Parquet, CSV, or a Dataset.save_to_disk folder",
    )
    imp.set_defaults(func=_import)

    prompts = sub.add_parser(
        "import-prompts",
        help="import unlabeled prompts (the policy phase's pool) into a local store",
    )
    prompts.add_argument(
        "--store", required=True, help="the organization's SQLite store (created if missing)"
    )
    prompts.add_argument(
        "files",
        nargs="+",
        help="one prompt per line (.txt), or rows with a 'prompt' field (text or messages): "
        "JSONL, JSON, Parquet, CSV, or a Dataset.save_to_disk folder",
    )
    prompts.set_defaults(func=_import_prompts)

    info = sub.add_parser("store-info", help="counts and privacy spent in a local store")
    info.add_argument("--store", required=True)
    info.add_argument(
        "--delta", type=float, help="delta for the epsilon shown (default: the run default)"
    )
    info.set_defaults(func=_store_info)

    audit = sub.add_parser(
        "privacy-report",
        help="every DP mechanism a store's ledger charged, composed by RDP and PRV",
    )
    audit.add_argument("--store", required=True)
    audit.add_argument("--delta", type=float, help="delta (default: the run default)")
    audit.add_argument("--json", action="store_true", help="print JSON instead of tables")
    audit.set_defaults(func=_privacy_report)

    demo = sub.add_parser(
        "demo-data", help="a simulated organization's comparisons as JSONL, to try things out"
    )
    demo.add_argument("--org", type=int, default=0, help="which simulated organization")
    demo.add_argument("--comparisons", type=int, default=500)
    demo.add_argument("--out", required=True, help="JSONL file to write")
    demo.add_argument(
        "--english",
        action="store_true",
        help="everyday English preference data (simulations/english_preferences.py) instead "
        "of the synthetic world's grammar",
    )
    demo.add_argument("--orgs", type=int, default=3, help="--english: organizations in all")
    demo.add_argument("--seed", type=int, default=0, help="--english: which data set")
    demo.add_argument(
        "--test", action="store_true", help="--english: the test set (all organizations alike)"
    )
    demo.set_defaults(func=_demo_data)

    add_evaluate_command(sub)
    add_base_command(sub)

    study = sub.add_parser(
        "labeling-study",
        help="simulate annotation campaigns: uncertainty-first vs random pair selection",
    )
    study.add_argument("--out", default="runs/labeling-study")
    study.add_argument("--repeats", type=int, default=3)
    study.add_argument("--budget", type=int, default=1000, help="labels per campaign")
    study.add_argument("--batch", type=int, default=100, help="labels between retrainings")
    study.add_argument("--pool", type=int, default=4000, help="unlabeled candidate pairs")
    study.set_defaults(func=_labeling_study)

    add_label_commands(sub)
    add_deployment_commands(sub, _parse_override)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    configure_operator_logging(logging.WARNING)
    args = build_parser().parse_args(argv)
    # A plain `kill` must unwind like Ctrl-C, so the servers we started are stopped by PID.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except (
        ImportFileError,
        PartitionError,
        StoreError,
        ConfigError,
        FileNotFoundError,
        FileExistsError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
