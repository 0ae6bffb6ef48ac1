"""`serve --workers N`: the supervisor that runs N worker processes on one port and
replaces one that dies (docs/design.md §6)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import structlog
from prometheus_client import multiprocess

from receiver import config

logger = structlog.get_logger(__name__)

# A dead worker is replaced after a pause that doubles from 1 s up to 30 s; a worker
# that ran for a minute resets it. Five deaths within a minute is a crash loop: the
# service stops (exit 1) and the orchestrator takes over.
RESTART_DELAY_SECONDS = 1.0
RESTART_DELAY_CAP_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 60.0
CRASH_LOOP_DEATHS = 5


def supervise(settings: config.Settings, *, host: str, port: int, count: int, dev: bool) -> int:
    """N worker processes share the port (SO_REUSEPORT; the kernel spreads connections).

    Each worker is a fresh interpreter started with PROMETHEUS_MULTIPROC_DIR set, which
    prometheus-client reads when it is imported: the workers keep their metrics in
    files there, and any worker's /metrics reports the sum. The parent has migrated;
    it forwards SIGTERM/SIGINT. A worker that dies is replaced after a backoff, as
    gunicorn's arbiter does, while the others keep serving; only a crash loop stops
    the service.
    """
    assert settings.database_url is not None
    metrics_dir = tempfile.mkdtemp(prefix="receiver-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    if not {"RECEIVER_DATABASE_URL", "RECEIVER_DATABASE_URL_FILE"} & set(os.environ):
        # As resolved here (the embedded Postgres in dev): workers must not start
        # another. A URL the operator gave stays where it was given: a worker reads
        # RECEIVER_DATABASE_URL_FILE itself (with both set, each worker would refuse to
        # start, and the password would sit in every worker's environment).
        env["RECEIVER_DATABASE_URL"] = settings.database_url.get_secret_value()
    # The workers hold the read end of this pipe, only this process its write end: when
    # this process dies, however (even SIGKILL), the workers read end of file and stop.
    # Portable, unlike PR_SET_PDEATHSIG, and immune to the workers' own sessions.
    watch_fd, alive_fd = os.pipe()
    argv = [sys.executable, "-m", "receiver", "serve", "--worker"]
    argv += ["--supervisor-fd", str(watch_fd)]
    argv += ["--host", host, "--port", str(port), *(["--dev"] if dev else [])]
    # Only waitpid() below reaps the workers: `running` is the bookkeeping. The Popen
    # objects are kept until then: one dropped while its process runs would be reaped
    # by subprocess's own cleanup at the next Popen, behind our back.
    running: dict[int, float] = {}  # pid -> when it started
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _: object = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def start_one() -> None:
        # A session of their own: a terminal's Ctrl-C (or any signal to the parent's
        # group) reaches the parent alone, which forwards it once. A second signal
        # would cut a worker's drain short. (Containers and systemd kill the whole
        # cgroup on SIGKILL, so workers do not outlive a killed parent there.)
        child = subprocess.Popen(  # noqa: S603
            argv,
            env=env,
            start_new_session=True,
            pass_fds=(watch_fd,),
            # Born ignoring SIGHUP (kept across exec) until it installs its own reload:
            # a reload forwarded while it starts would otherwise kill it (SIGHUP's
            # default), and a few in a row would look like a crash loop. It reads its
            # settings after that, so it misses no change.
            preexec_fn=_ignore_hangups,
        )
        running[child.pid] = time.monotonic()
        children[child.pid] = child

    def hang_up(_: int, __: object) -> None:
        # A reload (systemd's ExecReload): each worker reloads its own settings.
        logger.info("supervisor_reloading", workers=len(running), pid=os.getpid())
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGHUP, hang_up)
    deaths: list[float] = []
    restarts_due: list[float] = []
    delay = RESTART_DELAY_SECONDS
    try:
        for _ in range(count):
            start_one()
        while running or (restarts_due and not stopping):
            now = time.monotonic()
            if restarts_due and restarts_due[0] <= now and not stopping:
                restarts_due.pop(0)
                start_one()
                logger.info("worker_restarted", workers=len(running))
                continue
            # Polled, not a blocking wait(): a restart may be due before any child exits.
            pid, status = os.waitpid(-1, os.WNOHANG) if running else (0, 0)
            if pid == 0:
                time.sleep(0.1)
                continue
            started = running.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            children.pop(pid).returncode = code  # reaped: Popen must not wait for it
            multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
            if stopping and code in (0, -signal.SIGTERM, -signal.SIGINT):
                continue
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < HEALTHY_RUN_SECONDS] + [now]
            if len(deaths) >= CRASH_LOOP_DEATHS:
                logger.error("worker_crash_loop", pid=pid, status=code, deaths=len(deaths))
                stop_all()
                for other in list(running):  # let the others drain, then report
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(other, 0)
                    children.pop(other).returncode = 0
                running.clear()
                return 1
            delay = RESTART_DELAY_SECONDS if now - started >= HEALTHY_RUN_SECONDS else delay
            logger.error("worker_exited", pid=pid, status=code, restart_in_seconds=delay)
            restarts_due.append(now + delay)
            delay = min(delay * 2, RESTART_DELAY_CAP_SECONDS)
        return 0
    finally:
        stop_all()
        os.close(alive_fd)
        os.close(watch_fd)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _ignore_hangups() -> None:
    """In a new worker, between fork and exec (the supervisor runs no other thread)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
