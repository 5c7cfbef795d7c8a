"""Run the benchmarks: every scenario for every library, in turn, for several rounds; then write the
results into docs/benchmarks.md and draw docs/benchmarks.png.

    python benchmarks/run.py --rounds 3 --n 20000

Run it with the project's interpreter (the one with ``lifecycle`` and its ``redis`` extra installed). It
creates one virtualenv per peer under ``benchmarks/.venv-peers`` from ``requirements-peers.txt`` (pip
needs the package index the first time), starts a private ``redis-server`` on a free loopback port (stopped
at the end; the harness empties its database between runs, so it never touches a server others use), and
uses SQLite files in a temporary directory; the NATS scenarios start a private ``nats-server -js`` the same
way (``--nats-server PATH`` names the binary). The PostgreSQL scenarios (``pg_*``) use the shared server at
127.0.0.1:5432 (database ``test``) or ``--postgres-url``: every run gets a schema of its own
(``lifecycle_bench_<random>``, created empty for each run and dropped after it; every library is pointed at
it), so nothing else in that database is read, changed or dropped. ``--redis-url`` points it at a Redis
database of your own instead: one that is empty when the run starts (a database holding keys the harness did
not write is refused). See docs/benchmarks.md for the method and what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, venvs  # noqa: E402
from benchmarks.nats_server import PrivateNats, find_nats_server  # noqa: E402
from benchmarks.peers._common import RESULT_PREFIX, Config, PostgresAdmin, RedisAdmin  # noqa: E402
from benchmarks.redis_server import PrivateRedis, find_redis_server  # noqa: E402

OURS = report.OURS
PEERS = ("arq", "saq", "streaq", "taskiq", "dramatiq", "huey", "celery", "rq")
NATS_PEERS = ("taskiq_nats", "taskiq_nats_batched")
PG_PEERS = ("pgqueuer", "procrastinate")
VENV_OF = {"taskiq_nats_batched": "taskiq_nats"}  # adapters that run in another adapter's virtualenv
DRAIN_ONLY = ("taskiq_nats_batched",)
LIBRARIES = (OURS, *PEERS, *NATS_PEERS, *PG_PEERS)
SCENARIOS = (
    "drain",
    "enqueue",
    "latency",
    "mix",
    "sqlite_drain",
    "sqlite_enqueue",
    "nats_drain",
    "nats_enqueue",
    "nats_latency",
    "pg_drain",
    "pg_enqueue",
    "pg_latency",
    "core",
)
REDIS_SCENARIOS = ("drain", "enqueue", "latency", "mix")
NATS_SCENARIOS = ("nats_drain", "nats_enqueue", "nats_latency")
PG_SCENARIOS = ("pg_drain", "pg_enqueue", "pg_latency")
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SQLITE_LIBRARIES = (OURS, "huey")
NATS_LIBRARIES = (OURS, *NATS_PEERS)
NO_MIX = ("rq",)  # one job at a time per worker process: the concurrency-100 mix does not apply


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every default is the full run documented in docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario (default 3)")
    parser.add_argument("--n", type=int, default=20_000, help="tasks per drain/enqueue/mix run")
    parser.add_argument("--latency-n", type=int, default=2_000, help="tasks sent one at a time")
    parser.add_argument("--concurrency", type=int, default=32, help="worker concurrency for drain")
    parser.add_argument("--mix-concurrency", type=int, default=100, help="worker concurrency for the mix")
    parser.add_argument("--bulk-size", type=int, default=1_000, help="tasks per bulk enqueue call")
    parser.add_argument("--core-n", type=int, default=100_000, help="execute tasks to hot-add")
    parser.add_argument("--shutdown-n", type=int, default=10_000, help="running tasks to shut down")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated subset")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument(
        "--redis-url",
        help="an empty Redis database that nothing else uses (emptied between runs); by default the harness "
        "starts a private redis-server on a free loopback port and stops it at the end",
    )
    parser.add_argument(
        "--redis-server",
        metavar="PATH",
        help="the redis-server binary of the private server (default: $LIFECYCLE_BENCH_REDIS_SERVER, else "
        "redis-server on the PATH)",
    )
    parser.add_argument(
        "--nats-server",
        metavar="PATH",
        help="the nats-server binary of the private NATS server of the nats_* scenarios (default: "
        "$LIFECYCLE_BENCH_NATS_SERVER, else nats-server on the PATH)",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="the PostgreSQL database of the pg_* scenarios (default: the shared server's database test); "
        "each run creates a schema of its own there and drops it afterwards, touching nothing else",
    )
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds before a run is killed")
    parser.add_argument("--skip-install", action="store_true", help="use the peer venvs as they are")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="markdown file whose results section is replaced",
    )
    parser.add_argument(
        "--chart", default=str(ROOT / "docs" / "benchmarks.png"), help="PNG to draw ('none' to skip)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "latest.json",
        help="where the raw runs are saved",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run every worker under cProfile and save DIR/<library>-<scenario>-<round>.pstats "
        "(slows the workers: for finding where time goes, not for the table)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="only rewrite the markdown and chart from saved raw runs",
    )
    args = parser.parse_args(argv)
    args.libraries = _subset(args.libraries, LIBRARIES, "--libraries")
    args.scenarios = _subset(args.scenarios, SCENARIOS, "--scenarios")
    if args.rounds < 1 or args.n < 1 or args.latency_n < 1:
        parser.error("--rounds, --n and --latency-n must be at least 1")
    return args


def _subset(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def plan(args: argparse.Namespace, sqlite_dir: str) -> list[tuple[str, str, list[str]]]:
    """One round: (scenario, library, command) for every pair, libraries in the same order each round."""
    runs: list[tuple[str, str, list[str]]] = []
    for scenario in args.scenarios:
        if scenario == "core":
            for backend in ("asyncio", "trio"):
                for library, subject in ((OURS, "manager"), ("anyio", "raw")):
                    command = [
                        sys.executable,
                        "-m",
                        "benchmarks.core",
                        "--subject",
                        subject,
                        "--backend",
                        backend,
                        "--n",
                        str(args.core_n),
                        "--shutdown-n",
                        str(args.shutdown_n),
                        "--library",
                        library,
                    ]
                    runs.append((f"core_{backend}", library, command))
            continue
        for library in args.libraries:
            if scenario.startswith("sqlite") and library not in SQLITE_LIBRARIES:
                continue
            if (scenario in NATS_SCENARIOS) != (library in NATS_PEERS) and library != OURS:
                continue
            if (scenario in PG_SCENARIOS) != (library in PG_PEERS) and library != OURS:
                continue
            if library in DRAIN_ONLY and not scenario.endswith("drain"):
                continue
            if scenario == "mix" and library in NO_MIX:
                continue
            cfg = Config(
                library=library,
                scenario=scenario,
                n=args.latency_n if scenario in ("latency", "nats_latency", "pg_latency") else args.n,
                concurrency=args.mix_concurrency if scenario == "mix" else args.concurrency,
                redis_url=args.redis_url or "",
                sqlite_path=os.path.join(sqlite_dir, f"{library}.db"),
                bulk_size=args.bulk_size,
                timeout=max(30.0, args.run_timeout - 30),
                workload="sleep" if scenario == "mix" else "noop",
                nats_url=getattr(args, "nats_url", ""),
                nats_monitor=getattr(args, "nats_monitor", ""),
                postgres_url=args.postgres_url if scenario in PG_SCENARIOS else "",
                pg_schema=getattr(args, "pg_schema", "") if scenario in PG_SCENARIOS else "",
            )
            python = (
                sys.executable if library == OURS else str(venvs.python_for(VENV_OF.get(library, library)))
            )
            module = "benchmarks.peers.ours" if library == OURS else f"benchmarks.peers.{library}"
            runs.append((scenario, library, [python, "-m", module, *cfg.argv()]))
    return runs


def run_one(command: list[str], timeout: float, profile: Path | None = None) -> dict[str, Any]:
    """Run one benchmark process and return its result (``ok`` False with the error when it failed).

    With ``profile``, its worker process runs under cProfile and saves its statistics there.
    """
    env = dict(os.environ)
    env.pop("BENCH_PROFILE", None)
    if profile is not None:
        env["BENCH_PROFILE"] = str(profile)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.monotonic() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {"ok": True, "wall_s": wall, **json.loads(line[len(RESULT_PREFIX) :])}
    tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
    return {"ok": False, "wall_s": wall, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _versions(libraries: list[str]) -> dict[str, str]:
    from importlib import metadata

    import lifecycle

    stack = []
    for dist in ("redis", "hiredis", "nats-py", "psycopg", "anyio", "trio"):
        try:
            stack.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            stack.append(f"no {dist}")
    versions = {OURS: f"{lifecycle.__version__} ({', '.join(stack)})"}
    pins = venvs.read_sections()
    for library in libraries:
        pinned = VENV_OF.get(library, library)
        if pinned in pins:
            split = (pin.split("==") for pin in pins[pinned] if "==" in pin)
            named = {name.split("[")[0]: version for name, version in split}
            main = pinned.replace("_", "-")
            others = ", ".join(f"{name} {version}" for name, version in named.items() if name != main)
            versions[library] = named.get(main, "?") + (f" ({others})" if others else "")
    return versions


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}"


def _redis_for(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> bool:
    """Whether the chosen scenarios use Redis; when they do, set ``args.redis_url``: the private server
    started here (stopped by ``cleanup``), or the ``--redis-url`` database after checking that the harness
    may empty it (it is emptied again at the end). Exits with a message when neither is possible."""
    if not (set(args.scenarios) & set(REDIS_SCENARIOS) and args.libraries):
        return False
    if args.redis_url is None:
        try:
            server = cleanup.enter_context(PrivateRedis(find_redis_server(args.redis_server)))
        except (FileNotFoundError, RuntimeError) as error:
            raise SystemExit(str(error)) from None
        args.redis_url = server.url
        print(f"[redis] private redis-server on port {server.port} (pid {server.pid})", file=sys.stderr)
        return True
    admin = RedisAdmin(args.redis_url)
    try:
        admin.claim_own_db()
    finally:
        admin.close()
    cleanup.callback(_empty_own_db, args.redis_url)
    return True


def _nats_for(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> str:
    """When the chosen scenarios use NATS, start the private nats-server (stopped by ``cleanup``), set
    ``args.nats_url`` and ``args.nats_monitor``, and return its version; else ``"not used"``."""
    args.nats_url = args.nats_monitor = ""
    if not (set(args.scenarios) & set(NATS_SCENARIOS) and args.libraries):
        return "not used"
    try:
        binary = find_nats_server(args.nats_server)
        server = cleanup.enter_context(PrivateNats(binary))
    except (FileNotFoundError, RuntimeError) as error:
        raise SystemExit(str(error)) from None
    args.nats_url, args.nats_monitor = server.url, server.monitor
    print(f"[nats] private nats-server on port {server.port} (pid {server.pid})", file=sys.stderr)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return version.strip().removeprefix("nats-server: ") + " (JetStream, file storage)"


def _postgres_for(args: argparse.Namespace, cleanup: contextlib.ExitStack) -> str:
    """When the chosen scenarios use PostgreSQL, name this harness run's own schema (``args.pg_schema``: each
    run creates it empty and drops it; ``cleanup`` drops it too, should a run die first) and return the
    server's version; else ``"not used"``. Exits with a message when the server cannot be reached."""
    args.pg_schema = ""
    if not (set(args.scenarios) & set(PG_SCENARIOS) and args.libraries):
        return "not used"
    try:
        admin = PostgresAdmin(args.postgres_url)
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"--postgres-url {args.postgres_url}: cannot connect ({error})") from None
    try:
        version = admin.version()
    finally:
        admin.close()
    args.pg_schema = f"lifecycle_bench_{uuid.uuid4().hex[:12]}"
    cleanup.callback(_drop_own_schema, args.postgres_url, args.pg_schema)
    print(f"[postgres] runs use schema {args.pg_schema} of {_safe_url(args.postgres_url)}", file=sys.stderr)
    return f"{version} (database {_safe_url(args.postgres_url)}, a schema of its own per run)"


def _safe_url(url: str) -> str:
    """``url`` without its password, for the report."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _drop_own_schema(url: str, schema: str) -> None:
    admin = PostgresAdmin(url)
    try:
        admin.drop_own_schema(schema)
    finally:
        admin.close()


def _empty_own_db(url: str) -> None:
    admin = RedisAdmin(url)
    try:
        admin.flush_own_db(keep_mark=False)
    finally:
        admin.close()


def _redis_version(url: str) -> str:
    try:
        admin = RedisAdmin(url)
        info: str = admin.command("INFO", "server")
        admin.close()
    except OSError as error:
        return f"unreachable ({error})"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return f"{fields.get('redis_version', '?')} (appendonly {_appendonly(url)})"


def _appendonly(url: str) -> str:
    admin = RedisAdmin(url)
    try:
        reply = admin.command("CONFIG", "GET", "appendonly")
        return str(reply[1]) if isinstance(reply, list) and len(reply) > 1 else "?"
    except RuntimeError:
        return "?"
    finally:
        admin.close()


def write_outputs(result: dict[str, Any], output: Path, chart: str) -> None:
    """Rewrite the markdown results sections of the scenarios that ran (the NATS and PostgreSQL sections
    have their own markers, so a NATS-only or PostgreSQL-only run keeps the Redis and SQLite results) and
    draw the chart (in the report venv, with matplotlib)."""
    scenarios = {run["scenario"] for run in result["runs"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    if scenarios & set(NATS_SCENARIOS):
        report.update_markdown(output, report.render_nats(result), report.NATS_BEGIN, report.NATS_END)
        print(f"[report] wrote the NATS section of {output}", file=sys.stderr)
    if scenarios & set(PG_SCENARIOS):
        report.update_markdown(output, report.render_postgres(result), report.PG_BEGIN, report.PG_END)
        print(f"[report] wrote the PostgreSQL section of {output}", file=sys.stderr)
    if not scenarios - set(NATS_SCENARIOS) - set(PG_SCENARIOS):
        return
    if chart != "none":
        try:
            python = venvs.ensure_venv("report")
            subprocess.run(
                [str(python), str(ROOT / "benchmarks" / "chart.py"), "-", chart],
                input=json.dumps(result),
                text=True,
                check=True,
                cwd=ROOT,
            )
            result["meta"]["chart"] = os.path.relpath(chart, output.parent)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            print(f"[report] could not draw the chart: {error}", file=sys.stderr)
    report.update_markdown(output, report.render(result))
    print(f"[report] wrote {output}" + ("" if chart == "none" else f" and {chart}"), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Set up, run every round, save the raw runs, write the report. Returns the exit status."""
    args = parse_args(argv)
    if args.report_only:
        result = json.loads(args.report_only.read_text())
        write_outputs(result, args.output, args.chart)
        return 0
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as cleanup:
        redis = _redis_for(args, cleanup)
        nats_meta = _nats_for(args, cleanup)
        postgres_meta = _postgres_for(args, cleanup)
        sqlite_dir = tempfile.mkdtemp(prefix="lifecycle-bench-")
        cleanup.callback(shutil.rmtree, sqlite_dir, ignore_errors=True)
        round_plan = plan(args, sqlite_dir)
        if not args.skip_install:
            for library in dict.fromkeys(library for _, library, _ in round_plan):
                if library not in (OURS, "anyio"):
                    venvs.ensure_venv(VENV_OF.get(library, library))
        total = len(round_plan) * args.rounds
        for round_index in range(args.rounds):
            for scenario, library, command in round_plan:
                profile = None
                if args.profile is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profile = args.profile.resolve() / f"{library}-{scenario}-{round_index + 1}.pstats"
                outcome = run_one(command, args.run_timeout, profile)
                outcome.update(scenario=scenario, library=library, round=round_index + 1)
                runs.append(outcome)
                brief = json.dumps(outcome.get("metrics")) if outcome["ok"] else outcome["error"]
                print(
                    f"[{len(runs)}/{total}] round {round_index + 1} {scenario:<14} {library:<9} {brief}",
                    file=sys.stderr,
                    flush=True,
                )
        redis_meta = _redis_version(args.redis_url) if redis else "not used"
    params = {
        key: getattr(args, key)
        for key in (
            "rounds",
            "n",
            "latency_n",
            "concurrency",
            "mix_concurrency",
            "bulk_size",
            "core_n",
            "shutdown_n",
        )
    }
    result = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": _machine(),
            "python": f"Python {platform.python_version()}",
            "redis": redis_meta,
            "nats": nats_meta,
            "postgres": postgres_meta,
            "command": " ".join(
                shlex.quote(part) for part in ["python", "benchmarks/run.py", *(argv or sys.argv[1:])]
            ),
            "versions": _versions(args.libraries),
            "params": params,
        },
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    write_outputs(result, args.output, args.chart)
    return 0 if all(run["ok"] for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
