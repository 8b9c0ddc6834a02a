"""`gra-async run | estimate | refine | status | export | report | regate | doctor`: flags, the console, exit codes; nothing else.

A thin layer over the Python API (`gra_async.Synthesizer`). What an error means for the
process is decided here alone (`_exit_code`), the README's exit-code table: 0 target reached, 2 user
error (one line on stderr, no traceback), 3 stopped before the target (resumable),
75 stalled (resumable), 130 interrupted (resumable), 1 bug.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gra_async import defaults
from gra_async._concurrency import first_error, run_coroutine
from gra_async.config import ROLES, EndpointConfig, RunConfig, load_config, parse_endpoint_flag
from gra_async.errors import (
    ConfigError,
    EndpointError,
    GraError,
    Interrupted,
    RetriesExhausted,
    Stalled,
    TransientError,
    UsageError,
    UserError,
)
from gra_async.formats import FORMATS, default_name

if TYPE_CHECKING:
    from gra_async.synthesizer import RunSummary, Synthesizer

__all__ = ["main"]

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_SHORT, EXIT_STALLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 75, 130
_DEFAULT_RUN_DIR = Path("runs/demo")


def _exit_code(error: GraError) -> int:
    """What an error means for the process: the one place this is decided."""
    if isinstance(error, Interrupted):
        return EXIT_INTERRUPTED
    if isinstance(error, Stalled):
        return EXIT_STALLED
    if isinstance(error, UserError | UsageError):
        return EXIT_USER
    if isinstance(error, EndpointError) and not isinstance(error, TransientError):
        return EXIT_USER  # a refused key, a removed model: the user must act
    return EXIT_BUG


def _prog() -> str:
    """`gra-async` from the console script, `python -m gra_async` from -m."""
    return "python -m gra_async" if sys.argv[0].endswith("__main__.py") else "gra-async"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `run`, which `estimate` takes too: its pilot is the same run."""
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--seeds", type=Path, help="seed examples: .jsonl, .csv or .parquet (default: bundled)")
    parser.add_argument("--run-dir", type=Path,
                        help=f"run directory (default {_DEFAULT_RUN_DIR}); resume = same command again")
    parser.add_argument("--target", type=int, help="accepted samples to reach (default 20)")
    parser.add_argument("--endpoint", action="append", default=[], metavar="ROLE=[MODEL@]URL",
                        help="generator|reviewer|adjudicator endpoint; repeat for replicas and panels")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the key of --endpoint servers")
    parser.add_argument("--roles", choices=["fixed", "rotate"], help="role assignment (default fixed)")
    parser.add_argument("--reviewers", type=int, metavar="N", help="review panel size per sample (0 = no review; default all)")
    parser.add_argument("--no-adjudicator", action="store_true", help="ablation: disagreement is settled by the mean")
    parser.add_argument("--concurrency", type=int, metavar="N",
                        help=f"model calls in flight across the run (default {defaults.RUN_CONCURRENCY})")
    parser.add_argument("--rpm", type=int, help="requests per minute, per --endpoint")
    parser.add_argument("--tpm", type=int, help="tokens per minute, per --endpoint")
    parser.add_argument("--rounds", type=int, metavar="R", help="rounds; accepted samples join the next round's seeds")
    parser.add_argument("--max-tasks", type=int, metavar="N",
                        help="tasks planned per round (default 10x the round's target)")
    parser.add_argument("--seed", type=int, help="run seed: the plan and the role draws follow from it")
    parser.add_argument("--grace", type=float, help=f"seconds in-flight calls get after Ctrl-C (default {defaults.GRACE_SECONDS:g})")
    parser.add_argument("--force", action="store_true", help="continue a run directory made with another config")
    parser.add_argument("--retry-failed", action="store_true",
                        help="plan again failed tasks whose endpoint failed them (not their replies)")
    parser.add_argument("--shard", metavar="I/N",
                        help="plan only shard I of N (tasks I, I+N, ...): N orchestrators share "
                             "one plan; join them with merge")
    parser.add_argument("--no-metadata", action="store_true",
                        help="no keywords/summary call per accepted sample (metadata.enabled = false)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics while running")
    parser.add_argument("--metrics-host", metavar="HOST",
                        help=f"address the metrics listen on (default {defaults.METRICS_HOST})")
    parser.add_argument("--max-cost", type=float, metavar="USD",
                        help="stop before the spend at the endpoints' prices passes this (exit 3)")
    parser.add_argument("--mode", choices=["online", "batch"],
                        help="online calls, or waves through the provider's Batch API (default online)")


def _parser() -> argparse.ArgumentParser:
    from gra_async import __version__

    parser = _Parser(prog=_prog(), description="Synthesize instruction data with a team of small LLMs.")
    parser.add_argument("--version", action="version", version=f"gra-async {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="generate, review and keep samples until --target are accepted")
    _run_flags(run)

    estimate = sub.add_parser("estimate", help="run a small pilot and project the run's calls, "
                                               "tokens, cost and wall time (takes run's flags)")
    _run_flags(estimate)
    estimate.add_argument("--tasks", type=int, default=defaults.ESTIMATE_TASKS, metavar="N",
                          help=f"pilot tasks to start with, journaled for the real run "
                               f"(default {defaults.ESTIMATE_TASKS})")
    estimate.add_argument("--precision", type=float, default=defaults.ESTIMATE_PRECISION,
                          metavar="F",
                          help="grow the pilot until the cost's 95%% interval is within +-F "
                               f"(default {defaults.ESTIMATE_PRECISION}; 0: exactly --tasks)")
    estimate.add_argument("--json", action="store_true", help="one JSON object on stdout")

    refine = sub.add_parser("refine", help="GRA-Refined: review an existing dataset (--seeds), "
                                           "rewrite what the panel rejects, keep the rest")
    _run_flags(refine)
    refine.add_argument("--max-rewrites", type=int, metavar="N",
                        help="rewrites of a rejected seed, each reviewed again (default 1)")

    status = sub.add_parser("status", help="counts, calls and tokens of a run (works while it runs)")
    status.add_argument("--run-dir", type=Path, default=_DEFAULT_RUN_DIR,
                        help=f"run directory (default {_DEFAULT_RUN_DIR})")
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")

    export = sub.add_parser("export", help="write accepted samples with full provenance")
    export.add_argument("--run-dir", type=Path, default=_DEFAULT_RUN_DIR,
                        help=f"run directory (default {_DEFAULT_RUN_DIR})")
    export.add_argument("--format", choices=list(FORMATS), default="jsonl",
                        help="jsonl|parquet: every provenance field; alpaca|sharegpt|openai: "
                             "training files; hf: a datasets.load_from_disk folder with a card")
    export.add_argument("--out", type=Path,
                        help="output file, or folder for hf (default RUN_DIR/samples.FORMAT; "
                             "a .json name writes one JSON array, any other JSON Lines)")
    export.add_argument("--all", action="store_true", help="rejected and failed samples too")
    export.add_argument("--with-provenance", action="store_true",
                        help="training formats: keep the review, gate and model fields too")
    export.add_argument("--llamafactory", action="store_true",
                        help="add this export to the dataset_info.json beside it (LLaMA-Factory)")

    regate = sub.add_parser("regate", help="decide a run's samples again under another gate, "
                                           "from its journaled reviews, into a new run directory")
    regate.add_argument("--run-dir", type=Path, required=True, help="the run to re-gate (only read)")
    regate.add_argument("--out-run-dir", type=Path, required=True, help="the new run directory")
    regate.add_argument("--accept-mean", type=float, metavar="X", help="new gate.accept_mean")
    regate.add_argument("--disagreement-std", type=float, metavar="Y",
                        help="new gate.disagreement_std")
    regate.add_argument("--no-adjudicator", action="store_true",
                        help="disagreement is settled by the mean: no adjudicator call")
    regate.add_argument("--config", type=Path, help="TOML config whose adjudicator endpoints "
                        "serve samples that become disputed without a journaled verdict")
    regate.add_argument("--endpoint", action="append", default=[], metavar="adjudicator=[MODEL@]URL")
    regate.add_argument("--api-key-env", metavar="VAR")

    report = sub.add_parser("report", help="data-quality report: one self-contained HTML file "
                                           "with figures (works while the run writes)")
    report.add_argument("--run-dir", type=Path, default=_DEFAULT_RUN_DIR,
                        help=f"run directory (default {_DEFAULT_RUN_DIR})")
    report.add_argument("--out", type=Path, help="output file (default RUN_DIR/report.html)")

    prompts = sub.add_parser("prompts", help="copy the bundled prompt templates to edit them")
    prompts.add_argument("out", type=Path, metavar="DIR", help="folder to write the templates to")
    prompts.add_argument("--force", action="store_true", help="overwrite templates already there")

    doctor = sub.add_parser("doctor", help="probe every endpoint: reachable, key, model, JSON output")
    merge = sub.add_parser("merge", help="join run directories of one config (shards) into a new one, deduplicated across them")
    merge.add_argument("--run-dir", type=Path, action="append", required=True, dest="run_dirs",
                       metavar="DIR", help="a run directory to merge (repeat; earlier ones win ties)")
    merge.add_argument("--out", type=Path, required=True, help="the new run directory")

    doctor.add_argument("--config", type=Path)
    doctor.add_argument("--endpoint", action="append", default=[], metavar="ROLE=[MODEL@]URL")
    doctor.add_argument("--api-key-env", metavar="VAR")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as a nested dict on top of file and environment (flags win)."""
    run: dict[str, Any] = {}
    for flag, key in (("run_dir", "run_dir"), ("target", "target"), ("roles", "roles"),
                      ("reviewers", "reviewers"), ("concurrency", "concurrency"),
                      ("rounds", "rounds"), ("seed", "seed"), ("grace", "grace"),
                      ("max_tasks", "max_tasks"), ("metrics_port", "metrics_port"),
                      ("metrics_host", "metrics_host"), ("max_cost", "max_cost"),
                      ("mode", "mode"), ("shard", "shard")):
        value = getattr(args, flag, None)
        if value is not None:
            run[key] = value
    out: dict[str, Any] = {"run": run} if run else {}
    if getattr(args, "seeds", None) is not None:
        out["planner"] = {"seeds": args.seeds}
    if getattr(args, "no_adjudicator", False):
        out["gate"] = {"adjudicator": False}
    if getattr(args, "max_rewrites", None) is not None:
        out["refine"] = {"max_rewrites": args.max_rewrites}
    if getattr(args, "no_metadata", False):
        out["metadata"] = {"enabled": False}
    endpoints: dict[str, list[dict[str, Any]]] = {}
    for text in args.endpoint:
        role, fields = parse_endpoint_flag(text)
        for name in ("api_key_env", "rpm", "tpm"):
            value = getattr(args, name, None)
            if value is not None:
                fields[name] = value
        endpoints.setdefault(role, []).append(fields)
    if endpoints:
        out["endpoints"] = endpoints
    return out


def _config(args: argparse.Namespace) -> RunConfig:
    """File, then environment, then flags; flag endpoints replace the file's for their roles."""
    return load_config(args.config, overrides=_overrides(args), overrides_source="flags")


# --- run -------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    from gra_async.synthesizer import Synthesizer

    synth = Synthesizer(_config(args), force=args.force, retry_failed=args.retry_failed)
    summary, interrupted = await _drive(synth)
    return _ended(summary.run_dir, interrupted=interrupted, done=summary.reached_target,
                  so_far=f"{summary.accepted} accepted", explain=summary.explain(),
                  result=f"{summary.accepted} accepted")


def _ended(run_dir: Path, *, interrupted: bool, done: bool, so_far: str, explain: str,
           result: str) -> int:
    """The last words of `run` and `refine`, and their exit code."""
    if interrupted:
        raise Interrupted(f"interrupted; {so_far} so far. Run the same command again to resume.")
    if not done:
        print(explain, file=sys.stderr)
        return EXIT_SHORT
    print(f"done: {run_dir} ({result}); export with: {_prog()} export --run-dir {run_dir}")
    return EXIT_OK


async def _refine(args: argparse.Namespace) -> int:
    from gra_async.refining import Refiner

    for flag, value in (("--target", args.target), ("--rounds", args.rounds),
                        ("--max-tasks", args.max_tasks)):
        if value is not None:
            raise ConfigError(f"refine: {flag} does not apply (every seed of --seeds is one "
                              "task, in one round)")
    if args.seeds is None:
        raise ConfigError("refine: --seeds FILE is required (the dataset to refine)")
    if args.mode == "batch":
        raise ConfigError("refine: --mode batch is not supported yet; use online calls")
    refiner = Refiner(_config(args), force=args.force, retry_failed=args.retry_failed)
    run, interrupted = await _drive(refiner, lambda done: refiner.summarize(done).explain())
    summary = refiner.summarize(run)
    return _ended(summary.run_dir, interrupted=interrupted, done=summary.done,
                  so_far=f"{summary.kept + summary.rewritten} of {summary.seeds} seeds accepted",
                  explain=summary.explain(),
                  result=f"{summary.kept} kept, {summary.rewritten} rewritten, "
                         f"{summary.dropped} dropped")


async def _drive(
    synth: Synthesizer, explain: Callable[[RunSummary], str] | None = None,
) -> tuple[RunSummary, bool]:
    """Run with the live display and the signal handlers; (summary, interrupted).
    `explain` words the display's last line."""
    from gra_async.pipeline import plan_size
    from gra_async.progress import ProgressDisplay

    signals = _Signals(synth)
    async with synth:
        if synth.metrics_url is not None:
            print(f"metrics: {synth.metrics_url}", file=sys.stderr)
        live = synth.live_config
        display = ProgressDisplay(synth.progress, synth.endpoint_stats,
                                  plan=plan_size(live) * live.run.rounds)
        try:
            async with asyncio.TaskGroup() as group:
                refresh = group.create_task(display.refresh())
                try:
                    summary = await synth.run()
                finally:
                    refresh.cancel()
        except BaseExceptionGroup as errors:
            raise first_error(errors) from None
        display.final(summary, None if explain is None else explain(summary))
    return summary, signals.interrupted


async def _estimate(args: argparse.Namespace) -> int:
    from gra_async.pilot import run_pilot

    config = _config(args)
    grows = f", more until the cost is known to +-{args.precision:.0%}" if args.precision else ""
    print(f"pilot: {args.tasks} tasks{grows}, in {config.run.run_dir} (the run reuses them)",
          file=sys.stderr)
    result = await run_pilot(config, tasks=args.tasks, precision=args.precision,
                             force=args.force)
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(result.to_json()).decode() + "\n")
    else:
        print(result.table())
    return EXIT_OK


class _Signals:
    """First SIGINT/SIGTERM: stop admitting, give in-flight calls `run.grace` s; second: abandon.

    Installed before anything slow starts, so an early Ctrl-C is never a traceback.
    """

    def __init__(self, synth: Synthesizer) -> None:
        self.interrupted = False
        self._synth = synth
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.interrupted:
            self._synth.abandon()
            return
        self.interrupted = True
        print("stopping: finishing calls in flight (Ctrl-C again to abandon them)", file=sys.stderr)
        self._synth.stop()


# --- status / export / doctor --------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from gra_async.report import status_report

    report = status_report(args.run_dir)
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    else:
        from gra_async.report import format_status

        print(format_status(report))
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from gra_async.report import export

    out = args.out or args.run_dir / default_name(args.format)
    count, summary = export(args.run_dir, out, args.format, include_all=args.all,
                            with_provenance=args.with_provenance, llamafactory=args.llamafactory)
    print(f"wrote {count} samples to {out}; summary in {summary}"
          + (f"; LLaMA-Factory entry in {out.with_name('dataset_info.json')}"
             if args.llamafactory else ""))
    return EXIT_OK


async def _regate(args: argparse.Namespace) -> int:
    from gra_async.regating import regate_async

    endpoints: list[EndpointConfig] = []
    if args.config is not None or args.endpoint:
        config = _config(args)
        # In rotate every model may adjudicate (never its own sample: regate sees to that).
        roles = ROLES if config.run.roles == "rotate" else ("adjudicator",)
        endpoints = [e for role in roles for e in config.endpoints.get(role, ())]
    try:
        summary = await regate_async(
            args.run_dir, args.out_run_dir, accept_mean=args.accept_mean,
            disagreement_std=args.disagreement_std,
            adjudicator=False if args.no_adjudicator else None, endpoints=endpoints)
    except RetriesExhausted as exc:
        print(f"error: regate: {exc}; run the same command again to resume (paid "
              "adjudications are kept)", file=sys.stderr)
        return EXIT_SHORT
    print(summary.explain())
    return EXIT_OK


def _merge(args: argparse.Namespace) -> int:
    from gra_async.merge import merge_runs

    done = merge_runs(args.run_dirs, args.out)
    print(f"merged {done.sources} run directories into {done.out}: {done.accepted} accepted, "
          f"{done.duplicates} duplicates across them rejected, {done.samples} samples in all"
          + (f", {done.same_task} tasks found in more than one (the first kept)" if done.same_task else ""))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from gra_async.quality import write_report

    written = write_report(args.run_dir, args.out)
    print(f"wrote {written.path} ({written.samples} samples, {written.figures} figures, "
          f"{written.seconds:.1f} s)")
    return EXIT_OK


def _prompts(args: argparse.Namespace) -> int:
    from gra_async.prompts import default_prompts_dir

    source = default_prompts_dir()
    names = sorted(p.name for p in source.glob("*.md"))
    clash = [n for n in names if (args.out / n).exists()]
    if clash and not args.force:
        raise ConfigError(f"{args.out}: {', '.join(clash)} exist already (pass --force to overwrite)")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (args.out / name).write_bytes((source / name).read_bytes())
    except OSError as exc:
        raise ConfigError(f"{args.out}: cannot write the templates ({exc.strerror or exc})") from None
    print(f"wrote {', '.join(names)} to {args.out}; edit them and set prompts_dir = \"{args.out}\" "
          "in your config")
    return EXIT_OK


async def _doctor(args: argparse.Namespace) -> int:
    from gra_async.doctor import doctor

    config = _config(args)
    failed = await doctor(config, sys.stdout)
    if failed:
        print(f"error: doctor: {failed} endpoint(s) not usable (see the lines above)",
              file=sys.stderr)
        return EXIT_USER
    return EXIT_OK


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is now (a caller, or pytest, may have replaced it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _console_logging() -> None:
    """The library logs to `gra_async`; the CLI shows its warnings on stderr, one line each."""
    logger = logging.getLogger("gra_async")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    level = os.environ.get("GRA_LOG_LEVEL", "WARNING").upper()
    logger.setLevel(level if level in logging.getLevelNamesMapping() else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        _console_logging()
        args = _parser().parse_args(argv)
        if args.command == "run":
            return run_coroutine(_run(args))
        if args.command == "refine":
            return run_coroutine(_refine(args))
        if args.command == "estimate":
            return run_coroutine(_estimate(args))
        if args.command == "status":
            return _status(args)
        if args.command == "export":
            return _export(args)
        if args.command == "regate":
            return run_coroutine(_regate(args))
        if args.command == "prompts":
            return _prompts(args)
        if args.command == "report":
            return _report(args)
        if args.command == "merge":
            return _merge(args)
        return run_coroutine(_doctor(args))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except GraError as exc:
        code = _exit_code(exc)
        print(str(exc) if code == EXIT_INTERRUPTED else f"error: {exc}", file=sys.stderr)
        return code
