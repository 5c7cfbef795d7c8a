"""A service ready for Kubernetes: health probes, a phased drain, a restart policy and Prometheus metrics.

    python examples/kubernetes_service.py --health-port 8081 --drain-delay 5
    curl -i localhost:8081/readyz; curl localhost:8081/status; curl localhost:8081/metrics

In the pod spec (see docs/operations.md for the whole story):

    livenessProbe:  {httpGet: {path: /livez, port: 8081}, periodSeconds: 10}
    readinessProbe: {httpGet: {path: /readyz, port: 8081}, periodSeconds: 2}
    terminationGracePeriodSeconds: 45      # > drain delay + shutdown_timeout + cleanups

On SIGTERM the manager turns /readyz to 503 at once, keeps serving for --drain-delay seconds (so the
endpoints controller and load balancers stop sending traffic), then cancels the work and cleans up in
reverse order. The consumer crashes on its first message with --simulate-crash and is restarted by its
policy: watch /status show the restart.
"""

from __future__ import annotations

import argparse
import logging

import anyio

import lifecycle
from lifecycle import Restart, TaskType
from lifecycle.tasks import HealthServer, Timer

logger = logging.getLogger("orders")


class Database:
    """A stand-in for a connection pool: connects in initialize, closes in cleanup."""

    async def initialize(self) -> None:
        await anyio.sleep(0.1)  # connecting...
        logger.info("database connected")

    async def execute(self) -> None:
        await anyio.sleep_forever()

    async def cleanup(self) -> None:
        logger.info("database connection closed")


class Consumer:
    """Takes messages off a (pretend) queue; a crash is handled by its restart policy."""

    def __init__(self, *, interval: float, crash_first: bool) -> None:
        self.interval = interval
        self.crash_first = crash_first
        self.handled = 0

    async def execute(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            if self.crash_first:
                self.crash_first = False
                raise ConnectionError("message broker connection reset")
            self.handled += 1


def build(args: argparse.Namespace) -> lifecycle.TaskManager:
    """The service: health server first (so it answers during startup and is cleaned up last)."""
    manager = lifecycle.TaskManager(
        name="orders", drain_delay=args.drain_delay, shutdown_timeout=30, cleanup_timeout=10
    )
    manager.add_task("health", HealthServer(manager, host=args.host, port=args.health_port))
    manager.add_task("database", Database())
    consumer = Consumer(interval=0.2, crash_first=args.simulate_crash)
    manager.add_execute_task("consumer", consumer, restart=Restart(max_restarts=5, within=60))
    if args.seconds:
        manager.add_execute_task("timer", Timer(args.seconds), TaskType.STOP_GROUP)
    return manager


def main() -> int:
    """Parse the options and run the service under ``lifecycle.run`` (SIGTERM / Ctrl-C stop it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="health server address (0.0.0.0 in a pod)")
    parser.add_argument("--health-port", type=int, default=8081, help="health server port (0: any free)")
    parser.add_argument("--drain-delay", type=float, default=5.0, help="seconds to keep serving on SIGTERM")
    parser.add_argument("--seconds", type=float, default=0, help="stop by itself after this long")
    parser.add_argument("--simulate-crash", action="store_true", help="crash the consumer once")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    return lifecycle.run(build(args), backend=args.backend)


if __name__ == "__main__":
    raise SystemExit(main())
