"""Where one receiver process spends its time at full load: py-spy, summed.

    .venv/bin/python -m bench.profile [--seconds 8] [--rate 250] [--top 40] [--lean]

Starts `receiver serve` (or, with --lean, the lean reference) on a fresh database,
warms it up, then samples it with py-spy (`--nonblocking`: the process is never
paused) while the closed-loop load of `make bench` runs. Prints the share of
samples that passed through each function (inclusive) and that were in it (self),
our modules and the libraries alike. With uvloop, callbacks run from its C loop show
stacks that start at the callback; the shares are of all samples all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import harness, loadgen
from bench.run import warm_up


def _frame(frame: str) -> str:
    # "name (path/to/module.py:123)" -> "name (module.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':', 1)[0]})" if where else name


def summarise(raw: Path, top: int) -> str:
    """The inclusive and self shares of py-spy's raw (collapsed-stack) output."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
    lines = [f"{total} samples; inclusive share:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines.append("self share:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top // 2)]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--lean", action="store_true", help="profile bench/lean_server.py")
    args = parser.parse_args()
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: .venv/bin/pip install -e '.[dev]'")
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "samples.txt"
        async with harness.fresh_database(harness.server_dsn()) as url:
            env = harness.secrets_env(url)
            secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
            port = harness.free_port()
            serve = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
            if args.lean:
                serve = [sys.executable, "-m", "bench.lean_server", str(port)]
            with harness.receiver_process(env, port, serve) as process:
                await harness.wait_ready(port)
                await warm_up(port, secret, harness.onboardings, args.concurrency)
                count = int((args.seconds + 1) * 8_000)
                requests = loadgen.prebuilt(port, secret, harness.onboardings(count))
                sampler = subprocess.Popen(
                    [spy, "record", "--pid", str(process.pid), "--duration",
                     str(int(args.seconds)), "--rate", str(args.rate), "--nonblocking",
                     "--format", "raw", "--output", str(raw)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                answers = await loadgen.closed_loop(
                    port, requests, args.concurrency, args.seconds + 1
                )
                sampler.wait()
        print(f"{answers.only(200).rate:.0f} events/s while sampled")
        print(summarise(raw, args.top))


if __name__ == "__main__":
    asyncio.run(main())
