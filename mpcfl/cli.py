"""The ``mpcfl`` command: ``init``, ``validate``, ``schema``, ``run``, ``party``, ``dealer``, ``worker``, ``launch``,
``keygen``, ``baseline``, ``audit``, ``runs``, ``ledger``, ``predict``.

Errors a user can act on print as one line, ``mpcfl: error: ...``, and exit 1;
``--debug`` shows the traceback instead. A party that lost a peer exits 3, so the
launcher can tell the process that failed first from those that followed, and names the
peer it gave up waiting for, where it knows which, in a line of its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mpcfl import runs
from mpcfl.errors import WAITING_ON, MpcflError, PeerFailure, exit_code
from mpcfl.mpc import providers
from mpcfl.mpc.compat import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from mpcfl.jobs.schema import JobBase


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpcfl", description="Secure multi-party training and inference on CrypTen.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"mpcfl {_version()}")
    # --debug is accepted after the subcommand too; SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    resume = argparse.ArgumentParser(add_help=False)
    resume.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="RUN_ID",
        help="continue an unfinished run from its checkpoints instead of starting a new run (default: the "
        "newest unfinished run; see `mpcfl runs`)",
    )
    run = sub.add_parser("run", parents=[common, resume], help="run every party and the dealer of a job on this machine")
    run.add_argument("job", nargs="?", help="the YAML job file")
    run.add_argument("--key-dir", type=Path, help="for runtime.identity: the folder holding NAME.key of every process")
    key_file = argparse.ArgumentParser(add_help=False)
    key_file.add_argument(
        "--key-file", help="this process's private key, for jobs with runtime.identity; {name} in the path becomes "
        "the process's name (party or dealer), so one command line serves every rank under torchrun or srun",
    )
    key_file.add_argument(
        "--plain-network", action="store_true",
        help="confirm that runtime.channel: plain links may cross hosts (only inside a tunnel: the network can read them)",
    )

    party = sub.add_parser("party", parents=[common, key_file, resume], help="run one party of a job (one per host)")
    party.add_argument("job", nargs="?")
    party.add_argument("--party", required=True, help="this process's party name")
    party.add_argument("--rendezvous", help="tcp://HOST:PORT shared by all processes (default: $RENDEZVOUS)")
    party.add_argument("--run-id", help="a new run's id, as proposed to this party (party 0's proposal is the run's)")

    dealer = sub.add_parser("dealer", parents=[common, key_file], help="run the Beaver-triple dealer (TTP) of a job, or of `mpcfl launch`")
    dealer.add_argument("job", nargs="?", help="the job file (default: the session `mpcfl launch` describes)")
    dealer.add_argument("--rendezvous", help="tcp://HOST:PORT shared by all processes (default: $RENDEZVOUS)")

    worker = sub.add_parser(
        "worker", parents=[common, key_file, resume],
        help="run whichever role torchrun or srun gave this process (rank n = the dealer)",
    )
    worker.add_argument("job", nargs="?")

    baseline = sub.add_parser(
        "baseline", parents=[common], help="train the same job in plaintext PyTorch (reads every party's files; for measurement)"
    )
    baseline.add_argument("job")
    baseline.add_argument(
        "--score", nargs="?", const="latest", metavar="MODEL",
        help="instead of training, score a revealed model.pt (default: the first receiver's latest) on every party's files",
    )

    launch = sub.add_parser("launch", parents=[common], help="run a party script once per party, plus the dealer, on this machine")
    launch.add_argument("--parties", required=True, help="comma-separated party names, in rank order")
    launch.add_argument(
        "--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help=f"process-group timeout (default {DEFAULT_TIMEOUT_S:g})"
    )
    launch.add_argument(
        "--provider", choices=providers.NAMES, default=providers.DEFAULT,
        help="where Beaver triples come from: ttp, a dealer process (default); tfp, party 0 (tests only)",
    )
    launch.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the parties compute")
    launch.add_argument("script", nargs=argparse.REMAINDER, help="SCRIPT.py [ARGS...]")

    keygen = sub.add_parser("keygen", parents=[common], help="make an Ed25519 key pair for one process (runtime.identity)")
    keygen.add_argument("name", help="the party's name, or dealer")
    keygen.add_argument("--out", type=Path, default=Path("."), help="folder for NAME.key (mode 0600) and NAME.pub")

    audit = sub.add_parser("audit", parents=[common], help="membership-inference attacks on a trained model (reads every party's files)")
    audit.add_argument("job", help="the training job whose model to audit")
    audit.add_argument("--party", help="the receiver whose model.pt to audit (default: the first in model_to)")
    audit.add_argument("--shadows", type=int, default=16, help="shadow models for the LiRA attack (default 16; fewer gives a noisy AUC; 0 skips it)")

    listing = sub.add_parser("runs", parents=[common], help="list a job's runs at each party: status, times, final metrics")
    listing.add_argument("job")
    listing.add_argument("--party", help="only this party's runs (on a multi-host job, the party on this host)")

    ledger = sub.add_parser(
        "ledger", parents=[common], help="a party's privacy ledger of its dataset, across runs and jobs: show or reset it"
    )
    ledger.add_argument("action", choices=["show", "reset"])
    ledger.add_argument("job", help="a DP job naming the party's data")
    ledger.add_argument("--party", required=True, help="the party whose dataset's ledger (reads only its files)")
    ledger.add_argument("--reason", help="reset: why a fresh budget is started; kept in the ledger")

    predict = sub.add_parser(
        "predict", parents=[common],
        help="score new rows, split across the parties as in training, with a training run's model (on this machine)",
    )
    predict.add_argument("job", help="the training job whose model predicts")
    predict.add_argument("--rows", nargs="+", required=True, metavar="PARTY=FILE", help="each party's file of new rows")
    predict.add_argument("--to", nargs="+", required=True, metavar="PARTY", help="the parties that receive the predictions")
    predict.add_argument("--model-run", default="latest", help="the training run whose model predicts (default: latest)")
    predict.add_argument("--out", type=Path, help="outputs folder (default: the training job's outputs.dir/predictions)")
    predict.add_argument("--key-dir", type=Path, help="for runtime.identity: the folder holding NAME.key of every process")

    init = sub.add_parser(
        "init", parents=[common], help="write a commented job file from the parties' CSV files (then `mpcfl validate` it)"
    )
    init.add_argument(
        "--party", action="append", required=True, metavar="NAME=FILE",
        help="a party and its training CSV file, whose header row names its columns; once per party, in rank order",
    )
    init.add_argument("--test", action="append", default=[], metavar="NAME=FILE", help="a party's test CSV file (for every party or none)")
    init.add_argument("--label", required=True, metavar="COLUMN", help="the label column")
    init.add_argument("--partition", required=True, choices=["vertical", "horizontal"],
                      help="vertical: each party holds some columns of the same rows; horizontal: whole rows")
    init.add_argument("--task", choices=["train", "federated"], default="train",
                      help="train: secure training under MPC (default); federated: local training, updates averaged under MPC")
    init.add_argument("--id-column", metavar="COLUMN", help="vertical: a column of row IDs in every file, to line rows up by PSI")
    init.add_argument("--name", help="the job's name (default: from the --out file's name)")
    init.add_argument("--out", type=Path, required=True, help="the job file to write; an existing file is never overwritten")

    schema = sub.add_parser("schema", parents=[common], help="print the JSON schema of job files (for editors)")
    schema.add_argument("--task", help="only this task's jobs: train, federated, inference or predict (default: any)")

    validate = sub.add_parser("validate", parents=[common], help="check a job file without running it")
    validate.add_argument("job")
    validate.add_argument("--party", help="also load and check this party's data files")
    return parser


def _version() -> str:
    """This installation's version, from the package metadata."""
    import mpcfl

    return mpcfl.__version__


def _init(args: argparse.Namespace) -> None:
    """``mpcfl init``: a new, valid, commented job file from the parties' CSV headers."""
    from mpcfl.jobs import scaffold

    train = scaffold.party_files(args.party, "--party")
    if len(train) < 2:
        raise MpcflError("--party: give at least two parties, each as --party NAME=FILE")
    name = scaffold.job_name(args.name, args.out)
    text = scaffold.render(
        name=name, train=train, test=scaffold.party_files(args.test, "--test"), label=args.label,
        partition=args.partition, task=args.task, id_column=args.id_column, folder=args.out.parent,
    )
    scaffold.write_new(args.out, text)
    print(f"wrote {args.out} (job {name}, {len(train)} parties, {args.partition}); check it with `mpcfl validate {args.out}`")


def _schema(task: str | None) -> None:
    """``mpcfl schema``: the job files' JSON schema on stdout."""
    import json

    from mpcfl.jobs import registry

    if task is not None and task not in registry.TASKS:
        raise MpcflError(f"--task: unknown task {task!r} (tasks: {', '.join(registry.TASKS)})")
    print(json.dumps(registry.json_schema(task), indent=2))


def _setup_logging(debug: bool) -> None:
    # torch's C++ side logs each socket error it then raises; the raise becomes our one
    # line, so show the C++ lines only with --debug. Read once, when torch loads.
    if not debug:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    # crypten logs chatter on the root logger at INFO; keep ours at INFO, its at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mpcfl").setLevel(logging.DEBUG if debug else logging.INFO)


def _launch(args: argparse.Namespace) -> int:
    from mpcfl.launch.local import launch_script

    parties = [name.strip() for name in args.parties.split(",") if name.strip()]
    if len(parties) < 2 or len(set(parties)) != len(parties):
        raise MpcflError(f"--parties: give at least two distinct names, got {args.parties!r}")
    if not args.script:
        raise MpcflError("launch: name the party script to run")
    return launch_script(
        args.script, parties=parties, timeout_s=args.timeout_s, provider=args.provider, device=args.device,
        debug=args.debug,
    )


def _job_file(args: argparse.Namespace) -> None:
    """``mpcfl run --resume JOB``: the job file, not a run id, followed --resume."""
    if getattr(args, "job", "") is None:
        if isinstance(args.resume, str) and not runs.is_run_id(args.resume):
            args.job, args.resume = args.resume, True
        else:
            raise MpcflError(f"{args.command}: name the YAML job file")


def _list_runs(job: JobBase, only: str | None) -> None:
    """Each party's runs, oldest first: status, times, how often resumed, final metrics; ``*`` marks ``latest``."""
    for name in [job.party_names[job.rank_of(only)]] if only else job.party_names:
        root = job.party_root(name)
        found = runs.run_ids(root, job.name)
        latest = os.path.basename(os.readlink(root / runs.LATEST)) if (root / runs.LATEST).is_symlink() else None
        print(f"{name}: {len(found)} run(s) in {root}" + (" (* latest)" if latest else ""))
        for run_id in found:
            record = runs.Run(root, run_id).read()
            metrics = runs.headline_text(record.get("headline") or {})
            resumed = f"resumed x{len(record['resumed'])}" if record.get("resumed") else ""
            why = f"({record['error']})" if record.get("error") else ""
            mark = "*" if run_id == latest else " "
            print(f" {mark}{run_id}  {runs.status_of(record):<11}  started {record.get('started')}  ended "
                  f"{record.get('ended') or '-':<25}  {resumed:<10}  {metrics}{why}".rstrip())


def _ledger(job: JobBase, party: str, action: str, reason: str | None) -> None:
    """``mpcfl ledger show|reset``: the privacy ledgers of ``party``'s data files."""
    from mpcfl.data.party import contents, dataset_digest, ledger_keys, load_party_data
    from mpcfl.dp.ledger import DatasetLedger, open_ledgers

    dp = getattr(job, "dp", None)
    if dp is None:
        raise MpcflError(f"{job.source}: no dp section: the ledger's total comes from a DP job's epsilon and delta")
    name = job.party_names[job.rank_of(party)]
    if action == "reset" and not reason:
        raise MpcflError("ledger reset: say why with --reason (it is kept in the ledger)")
    keys = ledger_keys(job, name)
    ledgers = open_ledgers(list(keys), epsilon=dp.epsilon, delta=dp.delta, accountant=dp.accountant,
                           legacy=dataset_digest(contents(load_party_data(job, name))))
    for ledger in ledgers:
        files = ", ".join(map(str, keys[ledger.dataset]))
        if action == "reset":
            ledger.reset(reason)
            print(f"{name}: {files}: started a fresh budget for dataset {ledger.dataset[:16]}; "
                  f"the earlier charges stay in {ledger.path}")
            continue
        print(f"{name}: {files}: dataset {ledger.dataset[:16]} in {ledger.path}: epsilon {ledger.spent():.4g} spent of "
              f"{ledger.epsilon:g} at delta {ledger.delta:g} ({ledger.accountant}); {len(ledger.resets)} reset(s)")
        for run_id, run in ledger.runs.items():
            alone = DatasetLedger(ledger.path, ledger.dataset, ledger.epsilon, ledger.delta, ledger.accountant, {run_id: run})
            print(f"  run {run_id}  job {run['job']}  {len(run['charges'])} charge(s)  epsilon {alone.spent():.4g} alone  "
                  f"updated {run['updated']}")
        for entry in ledger.outside_dp:  # no budget covers these
            print(f"  outside DP: run {entry['run']}  job {entry['job']}  released {entry['what']}  at {entry['at']}")


def _predict(args: argparse.Namespace) -> int:
    """``mpcfl predict``: a predict job made from the command line, run on this machine."""
    import tempfile

    from mpcfl.api import job_file, predict_job
    from mpcfl.jobs.schema import load_job
    from mpcfl.launch.local import run_local

    rows = {}
    for item in args.rows:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MpcflError(f"--rows: {item!r} is not PARTY=FILE")
        rows[name] = Path(path)
    with tempfile.TemporaryDirectory(prefix="mpcfl-rows-") as folder:
        spec = predict_job(Path(args.job), rows, to=args.to, model_run=args.model_run, out=args.out, folder=Path(folder),
                           names=("--rows", "--to"))
        with job_file(spec) as path:
            return run_local(load_job(path), debug=args.debug, key_dir=args.key_dir)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "launch":
        return _launch(args)
    if args.command == "init":
        _init(args)
        return 0
    if args.command == "schema":
        _schema(args.task)
        return 0
    if args.command == "keygen":
        from mpcfl.mpc.keys import generate

        private, public = generate(args.name, args.out)
        print(f"wrote {private} (keep it on {args.name}'s host only) and {public}; in the job file:")
        print(f"  runtime.identity.public_keys.{args.name}: {public.read_text().strip()}")
        return 0
    if args.command == "dealer" and args.job is None:
        from mpcfl.launch.env import from_env
        from mpcfl.mpc.session import run_dealer

        run_dealer(from_env())
        return 0
    from mpcfl.jobs import registry
    from mpcfl.jobs.schema import load_job

    _job_file(args)
    if args.command == "predict":
        return _predict(args)
    job = load_job(args.job)
    task = registry.task_of(job)
    if getattr(args, "resume", False):
        task.require(job, registry.RESUME)
    if args.command == "runs":
        _list_runs(job, args.party)
        return 0
    if args.command == "ledger":
        _ledger(job, args.party, args.action, args.reason)
        return 0
    command, party, rendezvous = args.command, getattr(args, "party", None), getattr(args, "rendezvous", None)
    if command == "worker":
        from mpcfl.launch.worker import prefix_log_lines, role_from_launcher_env

        party, rendezvous = role_from_launcher_env(job)
        prefix_log_lines(party)
        command = "dealer" if party == providers.DEALER else "party"
    key = getattr(args, "key_file", None)
    key_file = Path(key.replace("{name}", party or providers.DEALER)) if key else None
    if getattr(args, "plain_network", False):
        from mpcfl.mpc.session import ENV_PLAIN_NETWORK

        os.environ[ENV_PLAIN_NETWORK] = "1"
    if command == "run":
        from mpcfl.launch.local import run_local

        return run_local(job, debug=args.debug, resume=args.resume, key_dir=args.key_dir)
    if command == "party":
        resume = {"resume": args.resume} if args.resume else {}  # only resumable tasks' runners take it
        run_id = getattr(args, "run_id", None)
        task.run_party()(job, party, rendezvous=rendezvous, key_file=key_file, run_id=run_id, **resume)
    elif command == "dealer":
        from mpcfl.jobs.session import session_of
        from mpcfl.mpc.session import run_dealer

        run_dealer(session_of(job, rendezvous=rendezvous, key_file=key_file), min_parties=job.survivors_needed)
    elif command == "baseline":
        task.require(job, registry.BASELINE)
        if args.score is not None:
            from mpcfl.api import score

            records = [score(job, None if args.score == "latest" else args.score)]
        else:
            from mpcfl.tasks.train.baseline import train_plaintext

            records = train_plaintext(job).history
        for record in records:
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    elif command == "audit":
        task.require(job, registry.AUDIT)
        from mpcfl.tasks.train.audit import audit, check_shadows, print_report

        warning = check_shadows(args.shadows)
        if warning:
            print(f"mpcfl: warning: {warning}", file=sys.stderr)
        receivers = job.outputs.model_to if isinstance(job.outputs.model_to, list) else []
        party = args.party or (receivers[0] if receivers else None)
        if party is None:
            raise MpcflError(f"{args.job}: outputs.model_to is none, so no party holds a model to audit")
        print_report(audit(job, runs.latest(job.party_root(job.party_names[job.rank_of(party)]), job.name) / "model.pt", shadows=args.shadows))
    elif command == "validate":
        from mpcfl.api import validate

        for line in validate(job, args.party):
            print(line)
    return 0


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (a launcher stopping the job) ends a process like Ctrl-C, so its run is marked stopped."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    _setup_logging(args.debug)
    if args.command in ("party", "worker"):
        signal.signal(signal.SIGTERM, _stop)
    try:
        return _dispatch(args)
    except MpcflError as err:
        if args.debug:
            raise
        if isinstance(err, PeerFailure) and err.waiting_on is not None:
            print(f"{WAITING_ON}{err.waiting_on}", file=sys.stderr)
        for line in str(err).splitlines() or [""]:  # a job file's errors, one line each; the last line, as ever
            print(f"mpcfl: error: {line}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print("mpcfl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mpcfl schema | head`: the reader left; nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's flush at exit is quiet
        return 0
    finally:
        # A launcher's SIGTERM to a process already on its way out ends it, with no traceback at shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
