"""`make bench`: the sidecar against direct access and against nginx, in one run, on loopback.

Variants, all driven by the same wrk script and settings:
  direct  - straight to the upstream (nginx serving a static chat completion);
  nginx   - nginx as a reverse proxy adding a static Authorization header (the practical limit);
  sidecar - `sidecar serve` with client credentials against the Entra ID emulator, same upstream.
Streams come from the project's upstream emulator, reached through the same upstream server by every variant.

Everything listens on 127.0.0.1, every loop is bounded in count and time, and every process started here is
stopped at the end, also on failure. Output: a table on stdout and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import load
import paced
import procs
import report
import sse
import yaml

HERE = Path(__file__).resolve().parent
STATIC_BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
    '"system_fingerprint":"fp_bench","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"Hello! How can I help you today?","refusal":null},"finish_reason":"stop","logprobs":null}],'
    '"usage":{"prompt_tokens":24,"completion_tokens":9,"total_tokens":33}}'
)
STREAM_PATH = "/openai/deployments/stream/chat/completions?api-version=2024-06-01"
SHORT_STREAM = (0.01, 5)  # seconds between events, events: the time-to-first-byte streams (~50 ms each)
LONG_STREAM = (0.2, 40)  # ~8 s: the streams held at once
TOKEN_LIFETIME = 3600.0  # longer than the run: exactly one identity-provider call is expected


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds before each wrk run")
    parser.add_argument("--connections", default="1,16,64", help="wrk connection counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds at the highest connection count (median)")
    parser.add_argument("--workers", default=None, help="sidecar `workers` setting (default: the config default)")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the sidecar's event loop (`sidecar serve` uses uvloop)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="run the sidecar with logging.access_log off")
    parser.add_argument(
        "--otel",
        type=float,
        nargs="?",
        const=1.0,
        default=None,
        metavar="RATIO",
        help="run the sidecar with tracing on (the otel extra) at this sample ratio (default 1), exporting to the "
        "upstream nginx (it answers 200 to anything)",
    )
    parser.add_argument("--held", default="100,1000", help="stream counts to hold at once")
    parser.add_argument("--ttfb-rounds", type=int, default=40)
    parser.add_argument("--burst-rounds", type=int, default=15)
    parser.add_argument("--output", default=str(HERE / "results" / "latest.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    return parser.parse_args()


def render(template: str, **values: object) -> str:
    text = (HERE / template).read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", str(value))
    return text


class Bench:
    """The processes of one run and the phases that measure them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.procs = procs.Procs()
        self.ports = {name: procs.free_port() for name in ("upstream", "nginx", "sidecar")}
        self.emulators: subprocess.Popen[bytes] | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.nginx_proxy: subprocess.Popen[bytes] | None = None
        self.details: dict[str, Any] = {}
        self.started_at = time.monotonic()

    # -- starting -------------------------------------------------------------------------------------

    def start_emulators(self) -> None:
        self.emulators = self.procs.start(
            [
                sys.executable,
                str(HERE / "emulators.py"),
                "--token-lifetime",
                str(TOKEN_LIFETIME),
                "--stream-delay",
                str(LONG_STREAM[0]),
                "--stream-chunks",
                str(LONG_STREAM[1]),
            ],
            log=self.dir / "emulators.log",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.details = json.loads(self._read_line(20.0))

    def _read_line(self, timeout: float) -> str:
        assert self.emulators is not None and self.emulators.stdout is not None
        ready, _, _ = select.select([self.emulators.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("the emulators did not answer in time")
        line = self.emulators.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"the emulators exited; see {self.dir / 'emulators.log'}")
        return line

    def emulator_command(self, command: str) -> dict[str, Any]:
        assert self.emulators is not None and self.emulators.stdin is not None
        self.emulators.stdin.write(command.encode() + b"\n")
        self.emulators.stdin.flush()
        return json.loads(self._read_line(10.0))

    def emulator_stats(self) -> dict[str, int]:
        return self.emulator_command("stats")

    def start_nginx(self) -> None:
        upstream_conf = self.dir / "nginx-upstream.conf"
        upstream_conf.write_text(
            render(
                "nginx-upstream.conf.tmpl",
                dir=self.dir,
                workers="auto",
                port=self.ports["upstream"],
                emulator_port=self.details["upstream_port"],
                static_body=STATIC_BODY,
            )
        )
        proxy_conf = self.dir / "nginx-proxy.conf"
        proxy_conf.write_text(
            render(
                "nginx-proxy.conf.tmpl",
                dir=self.dir,
                workers="auto",
                port=self.ports["nginx"],
                upstream_port=self.ports["upstream"],
                token=self.details["direct_token"],  # valid for the emulator too
            )
        )
        for name, conf in (("upstream", upstream_conf), ("nginx", proxy_conf)):
            process = self.procs.start(["nginx", "-p", str(self.dir), "-c", str(conf)], log=self.dir / f"{name}.log")
            procs.wait_port(self.ports[name], 10.0, process)
            if name == "nginx":
                self.nginx_proxy = process

    def sidecar_config(self) -> dict[str, Any]:
        d = self.details
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": self.ports["sidecar"]},
            "upstream": {"url": f"http://127.0.0.1:{self.ports['upstream']}", "read_timeout": 60},
            "tls": {"ca_bundle": d["ca_pem_path"]},
            "auth": {
                "flow": "client_credentials",
                "scope": d["scope"],
                "tenant_id": d["tenant_id"],
                "client_id": d["client_id"],
                "client_secret": d["client_secret"],
                "authority_host": d["entra_url"],
            },
            "logging": {"level": "INFO", "format": "text", "access_log": not self.args.no_access_log},
        }
        if self.args.otel is not None:  # spans exported for real, over HTTP, to a sink that costs next to nothing
            upstream = f"http://127.0.0.1:{self.ports['upstream']}"
            config["telemetry"] = {"otlp_endpoint": upstream, "sample_ratio": self.args.otel}
        if self.args.workers is not None:
            workers = self.args.workers
            config["workers"] = int(workers) if workers.isdigit() else workers
        return config

    def start_sidecar(self) -> float:
        """Start `sidecar serve`; seconds from the process start to /readyz 200."""
        path = self.dir / "sidecar.yaml"
        path.write_text(yaml.safe_dump(self.sidecar_config()))
        if self.args.loop == "uvloop":
            argv = [sys.executable, "-m", "sidecar", "serve", "--config", str(path)]
        else:  # the same CLI with uvloop hidden, so it falls back to asyncio.run
            argv = [
                sys.executable,
                "-c",
                "import sys; sys.modules['uvloop'] = None; from sidecar.cli import main; sys.exit(main(sys.argv[1:]))",
                "serve",
                "--config",
                str(path),
            ]
        started = time.perf_counter()
        self.sidecar = self.procs.start(argv, log=self.dir / "sidecar.log")
        deadline = started + 30.0
        while time.perf_counter() < deadline:
            if self.sidecar.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.sidecar.returncode}; see {self.dir / 'sidecar.log'}")
            if procs.http_status(self.ports["sidecar"], "/readyz", timeout=0.2) == 200:
                return time.perf_counter() - started
            time.sleep(0.002)
        raise RuntimeError("the sidecar was not ready within 30 s")

    def sidecar_pids(self) -> list[int]:
        assert self.sidecar is not None
        return procs.process_tree(self.sidecar.pid)

    def nginx_pids(self) -> list[int]:
        assert self.nginx_proxy is not None
        return procs.process_tree(self.nginx_proxy.pid)

    # -- phases -----------------------------------------------------------------------------------------

    def idle_memory(self) -> dict[str, Any]:
        pids = self.sidecar_pids()
        per_process = [round(procs.rss_mb(pid), 1) for pid in pids]
        return {
            "processes": len(pids),
            "rss_per_process_mb": per_process,
            "rss_total_mb": round(sum(per_process), 1),
            "pss_total_mb": round(sum(procs.pss_mb(pid) for pid in pids), 1),
        }

    def request_response(self) -> tuple[dict[str, Any], dict[str, Any]]:
        ports = {"direct": self.ports["upstream"], "nginx": self.ports["nginx"], "sidecar": self.ports["sidecar"]}
        owners = {"nginx": self.nginx_pids, "sidecar": self.sidecar_pids}
        results: dict[str, Any] = {}
        cpu: dict[str, Any] = {}
        levels = [int(c) for c in self.args.connections.split(",")]
        for connections in levels:
            # The throughput figure is taken at the highest level: there, rounds of all three variants repeat
            # (order rotating) and each variant's median round counts; this VM's neighbours make single runs
            # swing by 15 %. CPU per request is summed over all rounds.
            rounds = self.args.rounds if connections == max(levels) else 1
            runs: dict[str, list[load.WrkResult]] = {variant: [] for variant in ports}
            used = dict.fromkeys(owners, 0.0)
            order = list(ports)
            for round_no in range(rounds):
                for variant in order[round_no % 3 :] + order[: round_no % 3]:
                    port = ports[variant]
                    load.run_wrk(port, connections, self.args.warmup)
                    pids = owners[variant]() if variant in owners else []
                    before = procs.cpu_seconds(pids)
                    result = load.run_wrk(port, connections, self.args.seconds)
                    if variant in owners:
                        used[variant] += procs.cpu_seconds(pids) - before
                    runs[variant].append(result)
                    print(
                        f"  {connections:>3} conns {variant:<8} {result.rps:>9.0f} req/s  p50 {result.p50_ms:.3f} ms  "
                        f"p99 {result.p99_ms:.3f} ms  errors {result.errors}",
                        flush=True,
                    )
            level: dict[str, Any] = {"rounds": rounds}
            for variant, done in runs.items():
                result = sorted(done, key=lambda r: r.rps)[len(done) // 2]
                level[variant] = {
                    "rps": round(result.rps, 1),
                    "requests": result.requests,
                    "errors": sum(r.errors for r in done),
                    "p50_ms": result.p50_ms,
                    "p90_ms": result.p90_ms,
                    "p99_ms": result.p99_ms,
                    "mean_ms": round(result.mean_ms, 3),
                    "rps_all_rounds": [round(r.rps, 1) for r in done],
                }
                if variant in owners and connections == max(levels):
                    requests = sum(r.requests for r in done)
                    cpu[f"{variant}_s_per_1000"] = round(used[variant] / requests * 1000, 4)
                    cpu[f"{variant}_cpu_s"] = round(used[variant], 2)
                    cpu["connections"] = connections
            direct = level["direct"]
            for variant in ("nginx", "sidecar"):
                level[f"{variant}_added_p50_ms"] = round(level[variant]["p50_ms"] - direct["p50_ms"], 3)
                level[f"{variant}_added_p99_ms"] = round(level[variant]["p99_ms"] - direct["p99_ms"], 3)
            level["added_p50_ms"] = level["sidecar_added_p50_ms"]
            level["added_p99_ms"] = level["sidecar_added_p99_ms"]
            level["sidecar_over_nginx"] = round(level["sidecar"]["rps"] / level["nginx"]["rps"], 4)
            results[f"c{connections}"] = level
        return results, cpu

    async def sparse(self) -> dict[str, Any]:
        """The chat request with a pause before each one (reported, no target): sparse traffic's latency."""
        ports = {"direct": self.ports["upstream"], "nginx": self.ports["nginx"], "sidecar": self.ports["sidecar"]}
        tokens = {"direct": self.details["direct_token"]}
        out: dict[str, Any] = {}
        for gap, per_block in ((0.005, 50), (0.05, 10)):
            times: dict[str, list[float]] = {name: [] for name in ports}
            for block in range(4):  # interleaved blocks, the order rotating: drift hits every variant alike
                order = list(ports)[block % 3 :] + list(ports)[: block % 3]
                for name in order:
                    times[name] += await paced.paced(ports[name], token=tokens.get(name), gap=gap, count=per_block)
            p50 = {name: sse.percentile(values, 50) * 1000 for name, values in times.items()}
            out[f"gap_{int(gap * 1000)}ms"] = {
                "requests": len(times["direct"]),
                **{f"{name}_p50_ms": round(value, 3) for name, value in p50.items()},
                "nginx_added_p50_ms": round(p50["nginx"] - p50["direct"], 3),
                "added_p50_ms": round(p50["sidecar"] - p50["direct"], 3),
            }
        return out

    async def streaming(self) -> dict[str, Any]:
        direct = sse.Target("direct", self.ports["upstream"], STREAM_PATH, token=self.details["direct_token"])
        nginx = sse.Target("nginx", self.ports["nginx"], STREAM_PATH)
        sidecar = sse.Target("sidecar", self.ports["sidecar"], STREAM_PATH)
        targets = [direct, nginx, sidecar]
        out: dict[str, Any] = {}
        # Short streams read to the end, as an SDK does: connections are reused the same way in every variant.
        self.emulator_command(f"streams {SHORT_STREAM[0]} {SHORT_STREAM[1]}")
        await sse.sequential_ttfb(targets, 5, timeout=10)  # warm-up: pools, caches
        self.emulator_command("reset")
        kept: dict[str, list[float]] = {t.name: [] for t in targets}
        for _ in range(4):  # interleaved blocks: drift over time hits every variant alike
            for target in targets:
                kept[target.name] += await sse.kept_alive(target, self.args.ttfb_rounds // 4, timeout=10)
        out["single"] = _ttfb_summary(kept, "kept-alive connection, request sent to first event")
        self.emulator_command("reset")
        fresh = await sse.sequential_ttfb(targets, self.args.ttfb_rounds, timeout=10)
        out["single_fresh"] = _ttfb_summary(fresh, "new connection per stream, connect to first event")
        rounds: dict[str, list[float]] = {t.name: [] for t in targets}
        for round_no in range(self.args.burst_rounds):
            # the order rotates every round: none of the variants always follows the same one
            for target in targets[round_no % 3 :] + targets[: round_no % 3]:
                self.emulator_command("reset")
                await asyncio.sleep(0.2)  # let the previous burst's connections settle
                rounds[target.name].append(sse.percentile(await sse.burst(target, 100, timeout=20), 50) * 1000)
        median = {name: sorted(values)[len(values) // 2] for name, values in rounds.items()}
        out["burst_100"] = {
            "rounds": self.args.burst_rounds,
            **{f"{name}_p50_ms": round(value, 3) for name, value in median.items()},
            "nginx_added_p50_ms": round(median["nginx"] - median["direct"], 3),
            "added_p50_ms": round(median["sidecar"] - median["direct"], 3),
            "per_round_p50_ms": {name: [round(v, 2) for v in values] for name, values in rounds.items()},
        }
        self.emulator_command(f"streams {LONG_STREAM[0]} {LONG_STREAM[1]}")  # long enough to hold them all at once
        for count in (int(c) for c in self.args.held.split(",") if c):
            out[f"held_{count}"] = await self.hold(sidecar, count)
            await asyncio.sleep(1.0)
        return out

    async def hold(self, target: sse.Target, count: int) -> dict[str, Any]:
        peak = {"total": 0.0, "per_process": [0.0]}

        def sample() -> None:
            rss = [procs.rss_mb(pid) for pid in self.sidecar_pids()]
            if sum(rss) > peak["total"]:
                peak["total"], peak["per_process"] = sum(rss), rss

        started = time.monotonic()
        results, peak_open = await sse.hold_many(target, count, batch=100, batch_gap=0.1, timeout=30, sample=sample)
        errors = sorted({r.error for r in results if r.error})
        print(
            f"  held {count}: {sum(r.complete for r in results)} completed, {peak_open} open at once, "
            f"peak RSS {peak['total']:.1f} MB",
            flush=True,
        )
        return {
            "streams": count,
            "completed": sum(r.complete for r in results),
            "peak_open": peak_open,
            "peak_rss_total_mb": round(peak["total"], 1),
            "peak_rss_per_process_mb": [round(v, 1) for v in peak["per_process"]],
            "processes": len(peak["per_process"]),
            "errors": errors[:5],
            "seconds": round(time.monotonic() - started, 1),
        }

    def stop_sidecar(self) -> int | None:
        assert self.sidecar is not None
        return self.procs.stop(self.sidecar, grace=30.0)


def _ttfb_summary(times: dict[str, list[float]], how: str) -> dict[str, Any]:
    p50 = {name: sse.percentile(values, 50) * 1000 for name, values in times.items()}
    summary: dict[str, Any] = {"how": how, "streams": len(times["direct"])}
    for name, values in times.items():
        summary[f"{name}_p50_ms"] = round(p50[name], 3)
        summary[f"{name}_p99_ms"] = round(sse.percentile(values, 99) * 1000, 3)
    summary["nginx_added_p50_ms"] = round(p50["nginx"] - p50["direct"], 3)
    summary["added_p50_ms"] = round(p50["sidecar"] - p50["direct"], 3)
    return summary


def versions() -> dict[str, str]:
    import aiohttp

    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else ""

    return {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = Bench(args, workdir)
    try:
        print("starting emulators and nginx ...", flush=True)
        bench.start_emulators()
        bench.start_nginx()
        ready = bench.start_sidecar()
        print(f"sidecar ready after {ready:.3f} s", flush=True)
        time.sleep(1.0)
        idle = bench.idle_memory()
        print(f"idle RSS {idle['rss_total_mb']} MB over {idle['processes']} process(es)", flush=True)
        print("request/response ...", flush=True)
        rr, cpu = bench.request_response()
        print("sparse requests ...", flush=True)
        sparse = asyncio.run(bench.sparse())
        print("streaming ...", flush=True)
        streams = asyncio.run(bench.streaming())
        stats = bench.emulator_stats()
        exit_code = bench.stop_sidecar()
        elapsed = time.monotonic() - bench.started_at
    finally:
        bench.procs.stop_all()
    summary: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "seconds": args.seconds,
            "warmup": args.warmup,
            "connections": args.connections,
            "rounds_at_highest": args.rounds,
            "workers": args.workers or "default",
            "loop": args.loop,
            "access_log": not args.no_access_log,
            "otel_sample_ratio": args.otel,
            "wrk_threads": "min(2, connections)",
        },
        "versions": versions(),
        "rr": rr,
        "cpu": cpu,
        "sparse": sparse,
        "sse": streams,
        "idle": idle,
        "ready_s": round(ready, 3),
        "identity_provider": {
            "token_requests": stats["token_requests"],
            "token_lifetime_s": TOKEN_LIFETIME,
            "expected": max(1, -(-int(elapsed) // int(TOKEN_LIFETIME))),
        },
        "sidecar_exit_code": exit_code,
        "run_seconds": round(elapsed, 1),
    }
    summary["targets"] = report.judge(summary)
    return summary


def main() -> int:
    args = parse_args()
    # SIGTERM ends the run like Ctrl-C does: through the finally blocks that stop every process started here
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # 1,000 held streams take ~3,000 descriptors between the client and the sidecar
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536, hard)
        )
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (make bench installs it)", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    try:
        summary = run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(report.table(summary))
    print(f"\nJSON summary: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
