"""`make soak`: one `sidecar serve` under a long, mixed, faulty load; does it give back what it takes?

The sidecar (client credentials against the project's Entra ID emulator, as in `make bench`) gets, after a
warm-up of a twentieth of the same mix:
  - 100,000 ordinary requests: chat completions (JSON) and embeddings (base64, ~5 KB answers);
  - 5,000 SSE chat-completion streams, 20 % of them dropped by the caller after the first event;
  - upstream faults in between, scripted one-shot in the upstream emulator for chosen calls: 500s and
    429s (passed through), a hanging upstream (the sidecar answers 504 after upstream.read_timeout),
    streams reset mid-body (the sidecar cuts its caller off) and streams refused with a 500.
It runs at a fixed concurrency over kept-alive connections (each kept for 50-250 calls, then closed), and
fails when:
  - any call got an answer it should not have (a 5xx no fault caused, a connection error on a call that
    was not abandoned, a wrong body, a hang past its limit);
  - the sidecar's RSS at the end is more than --rss-limit-mb above its RSS after the warm-up;
  - its open descriptors do not come back: with the callers gone, everything but the pooled upstream
    connections must be at or below the count after the warm-up (callers gone too, pool warm), and once
    the pool's keep-alive has closed the idle upstream connections (30-60 s), the total must be at or below
    that baseline minus its upstream connections;
  - it took longer than --time-limit, a scripted fault was never used, the identity provider was called more
    than once (the token outlives the run), or the sidecar did not stop cleanly.
RSS, descriptors and identity-provider calls are printed at the start, after the warm-up, every 10,000
requests and at the end; a JSON summary goes to bench/results/soak.json. Loopback only; every process is
stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procs
import run
import sse
from soak_client import Mix, Op, Tally, worker
from yarl import URL

HERE = Path(__file__).resolve().parent
STREAM_SHAPE = (0.01, 8)  # seconds between events, events: a stream lasts ~70 ms, long enough to drop mid-way
READ_TIMEOUT = 3.0  # the sidecar's upstream.read_timeout: how long a hanging upstream holds a caller
SCRIPT_BLOCK = 1000  # operations per batch of scripted faults (scripted before the batch is sent)
CALLERS_GONE_WAIT = 15.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000, help="ordinary requests (after the warm-up)")
    parser.add_argument("--streams", type=int, default=5_000, help="SSE streams (after the warm-up)")
    parser.add_argument("--abandon", type=float, default=0.2, help="share of the streams dropped after one event")
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up size, as a share of the counts")
    parser.add_argument("--every", type=int, default=10_000, help="print a sample every N requests")
    parser.add_argument("--rss-limit-mb", type=float, default=10.0, help="allowed RSS growth after the warm-up")
    parser.add_argument("--drain-wait", type=float, default=75.0, help="seconds to wait for the pool to close")
    parser.add_argument("--time-limit", type=float, default=600.0, help="fail if the whole run takes longer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default=str(HERE / "results" / "soak.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    return parser.parse_args()


class Rig(run.Bench):
    """The benchmark's emulator and sidecar processes, the sidecar pointed straight at the upstream emulator."""

    def __init__(self, workdir: Path) -> None:
        # bench/run.py's options, as the soak runs its sidecar: uvloop, one process, access log on, no tracing
        super().__init__(argparse.Namespace(loop="uvloop", workers=None, no_access_log=False, otel=None), workdir)

    def sidecar_config(self) -> dict[str, Any]:
        config = super().sidecar_config()
        config["upstream"] = {"url": self.details["upstream_url"], "read_timeout": READ_TIMEOUT}
        return config

    @property
    def sidecar_port(self) -> int:
        return self.ports["sidecar"]

    @property
    def pid(self) -> int:
        assert self.sidecar is not None
        return self.sidecar.pid

    def fd_census(self) -> dict[str, int]:
        """The sidecar's open descriptors by what they are; sockets told apart by their ports in /proc/net."""
        ends: dict[str, tuple[int, int, str]] = {}
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                    ends[fields[9]] = (local, remote, fields[3])
        upstream_port = self.details["upstream_port"]
        idp_port = URL(self.details["entra_url"]).port
        counts = dict.fromkeys(("callers", "upstream", "identity_provider", "listening", "other"), 0)
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:  # closed while we looked
                continue
            local, remote, state = ends.get(target.removeprefix("socket:[").rstrip("]"), (0, 0, ""))
            if state == "0A":
                kind = "listening"
            elif local == self.sidecar_port:
                kind = "callers"
            elif remote == upstream_port:
                kind = "upstream"
            elif remote == idp_port:
                kind = "identity_provider"
            else:
                kind = "other"  # files, pipes, the event loop's own descriptors, unix sockets
            counts[kind] += 1
        counts["total"] = sum(counts.values())
        return counts


class Soak:
    def __init__(self, args: argparse.Namespace, rig: Rig) -> None:
        self.args = args
        self.rig = rig
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.deadline = self.started + args.time_limit

    def sample(self, label: str, tally: Tally | None = None) -> dict[str, Any]:
        stats = self.rig.emulator_stats()  # also drops the upstream's recorded requests: its memory stays flat
        pids = procs.process_tree(self.rig.pid)
        entry = {
            "label": label,
            "requests": tally.requests_done if tally else 0,
            "streams": tally.streams_done if tally else 0,
            "rss_mb": round(sum(procs.rss_mb(pid) for pid in pids), 1),
            "processes": len(pids),
            "fds": self.rig.fd_census(),
            "idp_token_requests": stats["token_requests"],
            "upstream_streams_closed_early": stats["streams_closed_early"],
            "pending_script": stats["pending_script"],
            "seconds": round(time.monotonic() - self.started, 1),
        }
        fds = entry["fds"]
        print(
            f"  {label:<26} {entry['requests']:>7} req {entry['streams']:>5} streams | RSS {entry['rss_mb']:6.1f} MB | "
            f"fds {fds['total']:>3} (callers {fds['callers']}, upstream {fds['upstream']}, "
            f"idp {fds['identity_provider']}, other {fds['other'] + fds['listening']}) | "
            f"IdP calls {entry['idp_token_requests']} | {entry['seconds']:.0f} s",
            flush=True,
        )
        self.samples.append(entry)
        return entry

    async def phase(self, ops: list[Op], tally: Tally, every: int | None, label: str) -> float:
        """Send `ops` at the set concurrency; seconds taken. Samples every `every` requests when given."""
        queue: asyncio.Queue[Op | None] = asyncio.Queue(maxsize=self.args.concurrency)
        rng = random.Random(self.args.seed + len(ops))
        started = time.monotonic()
        workers = [
            asyncio.create_task(worker(self.rig.sidecar_port, queue, tally, random.Random(rng.random())))
            for _ in range(self.args.concurrency)
        ]
        watcher = asyncio.create_task(self._watch(tally, every, label)) if every else None
        try:
            await asyncio.wait_for(self._feed(ops, queue, workers), max(0.0, self.deadline - time.monotonic()))
        finally:
            for task in [*workers, *([watcher] if watcher else [])]:
                task.cancel()
            await asyncio.gather(*workers, *([watcher] if watcher else []), return_exceptions=True)
        return time.monotonic() - started

    async def _feed(self, ops: list[Op], queue: asyncio.Queue[Op | None], workers: list[asyncio.Task[None]]) -> None:
        for start in range(0, len(ops), SCRIPT_BLOCK):
            block = ops[start : start + SCRIPT_BLOCK]
            faults = [op.script() for op in block if op.fault]
            if faults:  # before the block's calls are queued: a fault is always scripted before its call
                self.rig.emulator_command("script " + json.dumps(faults))
            for op in block:
                await queue.put(op)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)

    async def _watch(self, tally: Tally, every: int, label: str) -> None:
        mark = every
        while True:
            await asyncio.sleep(0.05)
            if tally.requests_done >= mark:
                self.sample(f"{label} {mark:,}", tally)
                mark += every

    async def poll(self, what: Callable[[], bool], seconds: float) -> bool:
        """Poll `what` (every 0.2 s) for up to `seconds`."""
        until = min(time.monotonic() + seconds, self.deadline)
        while not what():
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.2)
        return True


def outcome_counts(tally: Tally) -> dict[str, Any]:
    by = tally.outcomes

    def total(kind: str | None = None, fault: str | None = None, outcome: str | None = None) -> int:
        return sum(
            n
            for (k, f, o), n in by.items()
            if (kind is None or k == kind) and (fault is None or f == fault) and (outcome is None or o == outcome)
        )

    faults: Counter[str] = Counter()
    for (kind, fault, _), n in by.items():
        if fault != "-":
            faults[f"{'stream' if kind == 'stream' else 'request'} {fault}"] += n
    return {
        "requests": tally.requests_done,
        "chat": total("chat"),
        "embeddings": total("embeddings"),
        "streams": tally.streams_done,
        "streams_complete": total("stream", outcome="ok streamed"),
        "streams_abandoned": total("stream", outcome="ok abandoned"),
        "streams_cut_by_upstream_reset": total("stream", outcome="ok cut"),
        "faults": dict(sorted(faults.items())),
        "faults_total": sum(faults.values()),
        "unexpected": tally.unexpected_count,
        "unexpected_examples": tally.unexpected,
        "caller_connections_opened": tally.connections_opened,
        "statuses": {o: total(outcome=o) for o in sorted({o for (_, _, o) in by})},
    }


async def soak(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    s = Soak(args, rig)
    rng = random.Random(args.seed)
    mix = Mix(args.requests, args.streams, abandon_share=args.abandon)
    warm = Mix(round(args.requests * args.warmup), round(args.streams * args.warmup), abandon_share=args.abandon)
    warm_ops = warm.plan(rng)
    ops = mix.plan(rng, first_index=len(warm_ops))
    start = s.sample("start (ready, no load)")
    checks: list[dict[str, Any]] = []
    warm_tally, tally = Tally(), Tally()
    measured_s = 0.0
    end: dict[str, Any] | None = None
    drained: dict[str, Any] | None = None
    try:
        await s.phase(warm_ops, warm_tally, None, "warm-up")
        await s.poll(lambda: rig.fd_census()["callers"] == 0, CALLERS_GONE_WAIT)
        base = s.sample("after warm-up (baseline)", warm_tally)
        measured_s = await s.phase(ops, tally, args.every, "requests")
        print(f"  load done: {tally.requests_done:,} requests and {tally.streams_done:,} streams in {measured_s:.1f} s")
        callers_gone = await s.poll(lambda: rig.fd_census()["callers"] == 0, CALLERS_GONE_WAIT)
        end = s.sample("end (callers gone)", tally)
        pool_closed = await s.poll(lambda: rig.fd_census()["upstream"] == 0, args.drain_wait)
        drained = s.sample("end (upstream pool closed)", tally)
    except TimeoutError:
        checks.append({"check": "time limit", "ok": False, "detail": f"not done within {args.time_limit} s"})
        base = s.samples[1] if len(s.samples) > 1 else start
        callers_gone = pool_closed = False
    counts = outcome_counts(tally)
    warm_counts = outcome_counts(warm_tally)
    stats = rig.emulator_stats()
    exit_code = rig.stop_sidecar()
    elapsed = time.monotonic() - s.started
    checks += judge(args, base, end, drained, callers_gone, pool_closed, counts, warm_counts, stats, exit_code)
    if elapsed > args.time_limit and not any(c["check"] == "time limit" for c in checks):
        checks.append({"check": "time limit", "ok": False, "detail": f"{elapsed:.0f} s > {args.time_limit} s"})
    calls = counts["requests"] + counts["streams"]
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "requests": args.requests,
            "streams": args.streams,
            "abandon_share": args.abandon,
            "concurrency": args.concurrency,
            "warmup": {"requests": warm.requests, "streams": warm.streams},
            "stream_events": STREAM_SHAPE[1],
            "stream_event_gap_s": STREAM_SHAPE[0],
            "upstream_read_timeout_s": READ_TIMEOUT,
            "rss_limit_mb": args.rss_limit_mb,
            "time_limit_s": args.time_limit,
            "seed": args.seed,
            "workers": 1,
        },
        "versions": {"python": platform.python_version(), "cpus": str(os.cpu_count()), "kernel": platform.release()},
        "measured": counts,
        "warmup": warm_counts,
        "duration_s": round(measured_s, 1),
        "calls_per_s": round(calls / measured_s, 1) if measured_s else None,
        "requests_per_s": round(counts["requests"] / measured_s, 1) if measured_s else None,
        "request_latency_ms": {
            "p50": round(sse.percentile(tally.request_seconds, 50) * 1000, 2),
            "p99": round(sse.percentile(tally.request_seconds, 99) * 1000, 2),
        },
        "rss_mb": {
            "start": start["rss_mb"],
            "after_warmup": base["rss_mb"],
            "end": end["rss_mb"] if end else None,
            "end_pool_closed": drained["rss_mb"] if drained else None,
            "growth_after_warmup": round(end["rss_mb"] - base["rss_mb"], 1) if end else None,
            "peak_sampled": max(x["rss_mb"] for x in s.samples),
        },
        "fds": {
            "start": start["fds"],
            "after_warmup": base["fds"],
            "end": end["fds"] if end else None,
            "end_pool_closed": drained["fds"] if drained else None,
        },
        "identity_provider": {"token_requests": stats["token_requests"], "expected": 1},
        "upstream": {"streams_closed_early": stats["streams_closed_early"], "unused_faults": stats["pending_script"]},
        "sidecar_exit_code": exit_code,
        "samples": s.samples,
        "run_seconds": round(elapsed, 1),
        "checks": checks,
        "passed": all(c["ok"] for c in checks),
    }


def judge(
    args: argparse.Namespace,
    base: dict[str, Any],
    end: dict[str, Any] | None,
    drained: dict[str, Any] | None,
    callers_gone: bool,
    pool_closed: bool,
    counts: dict[str, Any],
    warm_counts: dict[str, Any],
    stats: dict[str, Any],
    exit_code: int | None,
) -> list[dict[str, Any]]:
    def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
        return {"check": name, "ok": bool(ok), "detail": detail}

    unexpected = counts["unexpected"] + warm_counts["unexpected"]
    abandoned = counts["streams_abandoned"] + warm_counts["streams_abandoned"]
    examples = (warm_counts["unexpected_examples"] + counts["unexpected_examples"])[:3]
    checks = [
        check("every answer as expected", unexpected == 0, f"{unexpected} unexpected, e.g. {examples}"),
        check("every scripted fault used", stats["pending_script"] == 0, f"{stats['pending_script']} left unused"),
        # the upstream emulator counts the streams whose reader went away before the end: a stream the caller
        # dropped must end upstream too (else the model keeps generating, and billing). Not all of them: a
        # starved sidecar may notice only after the upstream has written its last event.
        check(
            "abandoned streams ended upstream too (>= 90 %)",
            stats["streams_closed_early"] >= 0.9 * abandoned,
            f"{stats['streams_closed_early']} upstream streams closed early for {abandoned} abandoned",
        ),
        check("one identity-provider call", stats["token_requests"] == 1, f"{stats['token_requests']} token requests"),
        check("sidecar stopped cleanly", exit_code == 0, f"exit code {exit_code}"),
    ]
    if end is None or drained is None:
        return checks
    growth = end["rss_mb"] - base["rss_mb"]
    checks.append(
        check(
            f"RSS growth after the warm-up <= {args.rss_limit_mb} MB",
            growth <= args.rss_limit_mb,
            f"{base['rss_mb']} -> {end['rss_mb']} MB ({growth:+.1f})",
        )
    )
    b, e, d = base["fds"], end["fds"], drained["fds"]
    checks.append(check("caller connections all closed", callers_gone, f"{e['callers']} caller sockets left"))
    checks.append(
        check(
            "descriptors back to the baseline (pooled upstream connections aside)",
            e["total"] - e["upstream"] <= b["total"] - b["upstream"] and e["upstream"] <= args.concurrency,
            f"{e['total'] - e['upstream']} vs {b['total'] - b['upstream']} at the baseline; {e['upstream']} pooled "
            f"upstream connections (at most {args.concurrency}, the concurrency)",
        )
    )
    checks.append(
        check(
            "descriptors below the baseline once the pool closed its idle connections",
            pool_closed and d["total"] <= b["total"] - b["upstream"],
            f"{d['total']} open, {d['upstream']} upstream; baseline {b['total']} of which {b['upstream']} upstream",
        )
    )
    return checks


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally blocks, like Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    rig = Rig(workdir)
    try:
        print("starting the emulators and the sidecar ...", flush=True)
        rig.start_emulators()
        rig.emulator_command(f"streams {STREAM_SHAPE[0]} {STREAM_SHAPE[1]}")
        rig.start_sidecar()
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a Linux dependency of the project
            summary = asyncio.run(soak(args, rig))
        else:
            summary = uvloop.run(soak(args, rig))
    finally:
        rig.procs.stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    print(f"\nJSON summary: {output}")
    return 0 if summary["passed"] else 1


def report(summary: dict[str, Any]) -> str:
    m, rss, fds = summary["measured"], summary["rss_mb"], summary["fds"]
    lines = [
        "",
        f"{m['requests']:,} requests ({m['chat']:,} chat, {m['embeddings']:,} embeddings) and {m['streams']:,} streams "
        f"({m['streams_abandoned']:,} abandoned, {m['streams_cut_by_upstream_reset']:,} cut by an upstream reset) "
        f"in {summary['duration_s']} s: {summary['calls_per_s']} calls/s; faults {m['faults_total']:,} {m['faults']}",
        f"RSS {rss['start']} MB at the start, {rss['after_warmup']} after the warm-up, {rss['end']} at the end "
        f"({rss['growth_after_warmup']:+} MB), {rss['end_pool_closed']} with the pool closed",
        f"fds {fds['after_warmup']['total'] if fds['after_warmup'] else '?'} after the warm-up, "
        f"{fds['end']['total'] if fds['end'] else '?'} at the end, "
        f"{fds['end_pool_closed']['total'] if fds['end_pool_closed'] else '?'} with the pool closed; "
        f"identity-provider calls {summary['identity_provider']['token_requests']}",
        "",
    ]
    for c in summary["checks"]:
        lines.append(f"  [{'ok' if c['ok'] else 'FAILED'}] {c['check']}: {c['detail']}")
    lines.append(f"\nsoak {'passed' if summary['passed'] else 'FAILED'} in {summary['run_seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
