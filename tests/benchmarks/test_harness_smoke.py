"""The benchmark harness keeps working: a tiny run with our library only, plus its pure parts.

The full comparison with the peers (benchmarks/run.py without --libraries) is not part of the test suite;
it needs the peers' virtualenvs and a quiet machine. See docs/benchmarks.md. The PostgreSQL peers' adapters
get a tiny run each when their virtualenv is already there (``python benchmarks/venvs.py pgqueuer
procrastinate`` builds them); the suite never installs one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, venvs  # noqa: E402
from benchmarks.nats_server import PrivateNats, find_nats_server  # noqa: E402
from benchmarks.peers._common import OWNED_MARK, NatsAdmin, PostgresAdmin, RedisAdmin  # noqa: E402
from benchmarks.redis_server import PrivateRedis, find_redis_server  # noqa: E402

OUR_SCENARIOS = {
    *("drain", "enqueue", "latency", "mix", "sqlite_drain", "sqlite_enqueue"),
    *("nats_drain", "nats_enqueue", "nats_latency"),
    *("pg_drain", "pg_enqueue", "pg_latency"),
    *("core_asyncio", "core_trio"),
}
PG_SCENARIOS = {"pg_drain", "pg_enqueue", "pg_latency"}


def _run_schema(stderr: str) -> str:
    """The schema the harness named for its PostgreSQL runs, from its log."""
    found = re.search(r"\[postgres\] runs use schema (\w+)", stderr)
    assert found, f"the harness did not say which schema it used:\n{stderr[-2000:]}"
    return found.group(1)


def _schema_exists(dsn: str, schema: str) -> bool:
    admin = PostgresAdmin(dsn)
    try:
        return bool(admin.query(f"SELECT 1 FROM pg_namespace WHERE nspname = '{schema}'"))
    finally:
        admin.close()


@pytest.fixture
def redis_server() -> str:
    """The redis-server binary the harness starts privately (skips, or fails under
    LIFECYCLE_REQUIRE_SERVICES=1, when it is not installed)."""
    try:
        return find_redis_server()
    except FileNotFoundError as error:
        if os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1":
            pytest.fail(str(error), pytrace=False)
        pytest.skip(str(error))


@pytest.fixture
def nats_server() -> str:
    """The nats-server binary the harness starts privately (skips, or fails under
    LIFECYCLE_REQUIRE_SERVICES=1, when it is not installed)."""
    try:
        return find_nats_server()
    except FileNotFoundError as error:
        if os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1":
            pytest.fail(str(error), pytrace=False)
        pytest.skip(str(error))


def test_tiny_run_of_every_scenario_reports_numbers_for_our_library(
    redis_server: str, nats_server: str, postgres_dsn: str, tmp_path: Path
) -> None:
    # No --redis-url: the harness runs its own redis-server, so it empties no database others use.
    output = tmp_path / "benchmarks.md"
    output.write_text(
        "# Benchmarks\n\nprose that must survive\n\n"
        + f"{report.BEGIN}\nold\n{report.END}\n\nNATS prose\n\n"
        + f"{report.NATS_BEGIN}\nold NATS\n{report.NATS_END}\n\nPostgreSQL prose\n\n"
        + f"{report.PG_BEGIN}\nold PostgreSQL\n{report.PG_END}\n"
    )
    raw = tmp_path / "raw.json"
    command = [
        sys.executable, "benchmarks/run.py", "--rounds", "1", "--n", "200", "--latency-n", "20",
        "--core-n", "2000", "--shutdown-n", "300", "--libraries", "lifecycle", "--skip-install",
        "--redis-server", redis_server, "--nats-server", nats_server, "--run-timeout", "60",
        "--postgres-url", postgres_dsn,
        "--output", str(output), "--chart", "none",
        "--json", str(raw),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"harness failed:\n{proc.stderr[-4000:]}"
    assert not _schema_exists(postgres_dsn, _run_schema(proc.stderr)), "the run's schema is left behind"

    runs = json.loads(raw.read_text())["runs"]
    assert {run["scenario"] for run in runs} == OUR_SCENARIOS
    assert all(run["ok"] for run in runs), [run.get("error") for run in runs]
    ours = {run["scenario"]: run["metrics"] for run in runs if run["library"] == "lifecycle"}
    assert ours.keys() == OUR_SCENARIOS
    for scenario, concurrency in (("drain", 32), ("mix", 100), ("sqlite_drain", 32), ("pg_drain", 32)):
        assert ours[scenario]["tasks_per_s"] > 0
        assert ours[scenario]["cpu_ms_per_task"] > 0
        assert 1 <= ours[scenario]["peak_running"] <= concurrency, (scenario, ours[scenario])
    assert ours["drain"]["redis_cmds_per_task"] > 0
    # 200 tasks that sleep 10 ms at concurrency 100 need two waves of sleeps: a faster run means the worker
    # ran more tasks at once than its concurrency, and every mix number would be wrong.
    assert ours["mix"]["seconds"] >= 0.019, f"mix took {ours['mix']['seconds']:.4f} s: concurrency exceeded"
    for scenario in ("enqueue", "sqlite_enqueue", "nats_enqueue", "pg_enqueue"):
        assert ours[scenario]["single_per_s"] > 0
        assert ours[scenario]["bulk_per_s"] > 0
    assert ours["nats_drain"]["tasks_per_s"] > 0
    assert ours["nats_drain"]["nats_msgs_in_per_task"] > 0
    for scenario in ("latency", "nats_latency", "pg_latency"):
        assert 0 < ours[scenario]["p50_ms"] <= ours[scenario]["p99_ms"]
    assert ours["nats_latency"]["delayed_late_p50_ms"] >= 0, "a delayed task never starts before its time"
    for backend in ("asyncio", "trio"):
        assert ours[f"core_{backend}"]["hot_add_s"] > 0
        assert ours[f"core_{backend}"]["shutdown_s"] > 0
    assert {run["library"] for run in runs if run["scenario"] == "core_trio"} == {"lifecycle", "anyio"}

    text = output.read_text()
    assert "prose that must survive" in text
    assert "NATS prose" in text
    assert "PostgreSQL prose" in text
    assert "\nold\n" not in text
    assert "\nold NATS\n" not in text
    assert "\nold PostgreSQL\n" not in text
    assert "#### PostgreSQL drain" in text
    assert "| **lifecycle** |" in text
    assert "#### NATS drain" in text
    assert "### Failed runs" not in text
    assert "Failed runs:" not in text


@pytest.mark.postgres
@pytest.mark.parametrize("peer", ["pgqueuer", "procrastinate"])
def test_tiny_run_of_a_postgres_peer_when_its_venv_is_there(
    peer: str, postgres_dsn: str, tmp_path: Path
) -> None:
    if not venvs.python_for(peer).exists():  # the suite never installs a peer: see the module docstring
        pytest.skip(f"no virtualenv for {peer}; `python benchmarks/venvs.py {peer}` builds it")
    output, raw = tmp_path / "benchmarks.md", tmp_path / "raw.json"
    command = [
        sys.executable, "benchmarks/run.py", "--rounds", "1", "--n", "100", "--latency-n", "10",
        "--libraries", peer, "--scenarios", ",".join(sorted(PG_SCENARIOS)), "--skip-install",
        "--postgres-url", postgres_dsn, "--run-timeout", "90", "--output", str(output), "--chart", "none",
        "--json", str(raw),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"harness failed:\n{proc.stderr[-4000:]}"
    assert not _schema_exists(postgres_dsn, _run_schema(proc.stderr)), "the run's schema is left behind"
    runs = json.loads(raw.read_text())["runs"]
    assert {(run["scenario"], run["library"]) for run in runs} == {(s, peer) for s in PG_SCENARIOS}
    assert all(run["ok"] for run in runs), [run.get("error") for run in runs]
    metrics = {run["scenario"]: run["metrics"] for run in runs}
    assert metrics["pg_drain"]["tasks_per_s"] > 0
    assert 1 <= metrics["pg_drain"]["peak_running"] <= 32
    assert metrics["pg_enqueue"]["single_per_s"] > 0
    assert metrics["pg_enqueue"]["bulk_per_s"] > 0
    assert 0 < metrics["pg_latency"]["p50_ms"] <= metrics["pg_latency"]["p99_ms"]
    assert f"| {peer} |" in output.read_text()


@pytest.mark.postgres
def test_a_postgres_schema_the_harness_did_not_create_is_never_dropped(
    postgres_dsn: str, unique_name: str
) -> None:
    admin = PostgresAdmin(postgres_dsn)
    try:
        admin.query(f'CREATE SCHEMA "{unique_name}"; CREATE TABLE "{unique_name}".kept (x int)')
        with pytest.raises(SystemExit, match="did not create it"):
            admin.reset_schema(unique_name)
        with pytest.raises(SystemExit, match="did not create it"):
            admin.drop_own_schema(unique_name)
        assert admin.query(f'SELECT count(*) FROM "{unique_name}".kept') == [["0"]]
        admin.query(f'DROP SCHEMA "{unique_name}" CASCADE')

        admin.reset_schema(unique_name)  # absent: created, marked as the harness's own
        admin.query(f'CREATE TABLE "{unique_name}".made_by_a_run (x int)')
        admin.reset_schema(unique_name)  # its own: dropped and created empty again
        assert admin.query(f"SELECT count(*) FROM pg_tables WHERE schemaname = '{unique_name}'") == [["0"]]
        admin.drop_own_schema(unique_name)
        assert not admin.query(f"SELECT 1 FROM pg_namespace WHERE nspname = '{unique_name}'")
        with pytest.raises(RuntimeError, match="42P01"):  # a server error is raised, the connection goes on
            admin.query("SELECT * FROM no_such_table_here")
        assert admin.query("SELECT 1, NULL") == [["1", None]]
    finally:
        admin.query(f'DROP SCHEMA IF EXISTS "{unique_name}" CASCADE')
        admin.close()


def test_the_private_redis_server_is_stopped_and_removed(redis_server: str) -> None:
    with PrivateRedis(redis_server) as server:
        pid = server.pid
        assert pid is not None
        admin = RedisAdmin(server.url)
        assert admin.command("PING") == "PONG"
        admin.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_private_nats_server_is_stopped_and_its_streams_deleted_between_runs(nats_server: str) -> None:
    with PrivateNats(nats_server) as server:
        pid = server.pid
        assert pid is not None
        admin = NatsAdmin(server.url, server.monitor)
        try:
            created = admin.request(
                "$JS.API.STREAM.CREATE.bench_probe", b'{"name":"bench_probe","subjects":["p"]}'
            )
            assert created["config"]["name"] == "bench_probe"
            before = admin.counters()
            admin.delete_all_streams()
            assert admin.request("$JS.API.STREAM.NAMES", b"{}")["streams"] in (None, [])
            assert admin.counters()[0] > before[0], "the monitoring port counts the messages clients send"
        finally:
            admin.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_database_holding_keys_the_harness_did_not_write_is_never_emptied(redis_server: str) -> None:
    with PrivateRedis(redis_server) as server:
        admin = RedisAdmin(server.url)
        try:
            admin.command("SET", "someone-elses", "data")
            with pytest.raises(SystemExit, match="holds 1 key"):
                admin.flush_own_db()
            assert admin.command("GET", "someone-elses") == "data"

            admin.command("DEL", "someone-elses")
            admin.flush_own_db()  # empty: the harness takes it, and may empty it from now on
            admin.command("SET", "written-by-a-run", "1")
            admin.command(  # several SCAN pages of keys, one of them not UTF-8
                "EVAL",
                "for i = 1, 2500 do redis.call('SET', 'run:' .. i, i) end "
                "redis.call('SET', string.char(255, 254), 1)",
                "0",
            )
            assert admin.command("DBSIZE") == 2503
            admin.flush_own_db()
            assert admin.command("DBSIZE") == 1
            assert admin.command("EXISTS", OWNED_MARK) == 1
            admin.flush_own_db(keep_mark=False)
            assert admin.command("DBSIZE") == 0
        finally:
            admin.close()


def test_every_peer_has_a_pinned_section_and_an_adapter() -> None:
    sections = venvs.read_sections()
    peers = ("arq", "saq", "streaq", "taskiq", "dramatiq", "huey", "celery", "rq", "taskiq_nats")
    peers_pg = ("pgqueuer", "procrastinate")
    assert (ROOT / "benchmarks" / "peers" / "taskiq_nats_batched.py").is_file()
    for peer in (*peers, *peers_pg):
        assert peer in sections, peer
        assert all("==" in requirement for requirement in sections[peer]), sections[peer]
        assert (ROOT / "benchmarks" / "peers" / f"{peer}.py").is_file()
    assert "report" in sections


def test_requirements_outside_a_section_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text("arq==1.0\n# == arq ==\narq==1.0\n")
    with pytest.raises(ValueError, match="outside any"):
        venvs.read_sections(path)


def test_medians_min_max_and_failures_are_aggregated_per_library() -> None:
    runs = [
        {"ok": True, "scenario": "drain", "library": "x", "metrics": {"tasks_per_s": value}}
        for value in (300.0, 100.0, 200.0)
    ] + [{"ok": False, "scenario": "drain", "library": "y", "error": "exit 1: boom"}]
    table, errors = report.aggregate(runs)
    stat = table["drain"]["x"]["tasks_per_s"]
    assert (stat.median, stat.low, stat.high) == (200.0, 100.0, 300.0)
    assert stat.fmt() == "200 (100-300)"
    assert errors == {("drain", "y"): ["exit 1: boom"]}


def test_update_markdown_replaces_only_the_results_section(tmp_path: Path) -> None:
    path = tmp_path / "doc.md"
    path.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    report.update_markdown(path, f"{report.BEGIN}\nnew\n{report.END}")
    assert path.read_text() == f"intro\n{report.BEGIN}\nnew\n{report.END}\noutro\n"
    fresh = tmp_path / "fresh.md"
    report.update_markdown(fresh, f"{report.BEGIN}\nnew\n{report.END}")
    assert fresh.read_text().startswith("## Results\n\n" + report.BEGIN)


def test_the_flow_benchmark_runs_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import flow

    assert flow.main(["--n", "300", "--keys", "30", "--rounds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["median_tasks_per_s"]) == {"plain", "limits_registered", "per_key"}
    assert all(rate > 0 for rate in result["median_tasks_per_s"].values())
    assert result["relative_to_plain"]["plain"] == 1.0


@pytest.mark.postgres
def test_the_postgres_flow_benchmark_runs_both_scenarios(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from benchmarks import postgres_flow

    asyncio.run(postgres_flow.main(["--dsn", postgres_dsn, "--n", "200", "--keys", "20", "--rounds", "1"]))
    lines = capsys.readouterr().out.splitlines()
    medians = {line.split()[1]: float(line.split()[2]) for line in lines if line.startswith("median ")}
    assert set(medians) == {"plain", "per_key"}
    assert all(rate > 0 for rate in medians.values())


def test_the_ab_drain_compares_two_versions_and_leaves_no_store(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    completed = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "ab_drain.py"), "--refs", "HEAD,WORKTREE"),
            *("--backends", "sqlite", "--n", "40", "--rounds", "2", "--concurrency", "4", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    drain = json.loads(completed.stdout)["drain"]["sqlite"]
    assert set(drain) == {"HEAD", "WORKTREE"}
    assert all(row["median"] > 0 for row in drain.values())
    assert drain["HEAD"]["relative"] == 1.0
    assert list(tmp_path.iterdir()) == []  # its exported trees and stores are gone


def test_the_ab_enqueue_reports_rate_and_cpu_per_enqueue_and_saves_profiles(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    completed = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "ab_enqueue.py"), "--refs", "HEAD,WORKTREE"),
            *("--backends", "memory", "--n", "50", "--rounds", "1", "--profile", str(profiles)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert completed.returncode == 0, completed.stderr
    lines = [line.split() for line in completed.stdout.splitlines() if line.startswith("memory ")]
    assert [line[1] for line in lines] == ["HEAD", "WORKTREE"]
    assert all(float(line[2].removesuffix("/s")) > 0 for line in lines)
    assert all("CPU/enqueue" in line for line in lines)
    saved = sorted(path.name for path in profiles.iterdir())
    assert saved == ["HEAD-memory-1.pstats", "WORKTREE-memory-1.pstats"]
    assert list(scratch.iterdir()) == []  # its exported trees are gone


@pytest.mark.redis
def test_the_redis_script_cost_benchmark_runs_plain_groups_and_a_baseline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import redis_lua

    figures = redis_lua.main(
        ["--n", "300", "--batch", "50", "--group", "20", "--rounds", "1", "--variants", "plain,groups"]
    )
    assert set(figures) == {"plain", "groups"}
    timed = ("claim_usec_per_task", "settle_usec_per_task", "claim_commands_per_task", "tasks_per_second")
    assert all(figures["plain"][key] > 0 for key in timed)  # CPU times count in 10 ms ticks: may be 0 here
    assert figures["groups"]["settle_commands_per_task"] > figures["plain"]["settle_commands_per_task"]
    compared = redis_lua.main(["--n", "200", "--rounds", "1", "--baseline", str(ROOT / "src")])
    assert 0.2 < compared["claim_ratio"] < 5, "the same code on both sides"


@pytest.mark.redis
def test_the_redis_notice_latency_benchmark_reports_both_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import redis_notices

    redis_notices.main(["--n", "20"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["cancel", "settled"]
