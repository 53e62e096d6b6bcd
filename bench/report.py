"""The targets, and the two outputs: a table for people and a JSON summary for machines."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    unit: str
    limit: float | None  # None: reported only
    value: Callable[[dict[str, Any]], float | None]
    higher_is_better: bool = False

    def judge(self, summary: dict[str, Any]) -> dict[str, Any]:
        value = self.value(summary)
        if self.limit is None:
            status = "reported"
        elif value is None or math.isnan(value):
            status = "missed"
        elif self.higher_is_better:
            status = "met" if value >= self.limit else "missed"
        else:
            status = "met" if value <= self.limit else "missed"
        return {
            "key": self.key,
            "label": self.label,
            "value": value,
            "limit": self.limit,
            "unit": self.unit,
            "comparison": ">=" if self.higher_is_better else "<=",
            "status": status,
        }


def _get(*path: str | int) -> Callable[[dict[str, Any]], float | None]:
    def read(summary: dict[str, Any]) -> float | None:
        node: Any = summary
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return None if node is None else float(node)

    return read


def _idp_exact(summary: dict[str, Any]) -> float | None:
    idp = summary.get("identity_provider", {})
    calls, expected = idp.get("token_requests"), idp.get("expected")
    return None if calls is None else float(abs(calls - expected))


def _held_ok(count: int) -> Callable[[dict[str, Any]], float | None]:
    def read(summary: dict[str, Any]) -> float | None:
        held = summary.get("sse", {}).get(f"held_{count}")
        if not held:
            return None
        # a peak RSS only counts if every stream was really held at once and completed
        if held["completed"] != count or held["peak_open"] != count:
            return float("nan")
        return float(held["peak_rss_total_mb"])

    return read


TARGETS = (
    Target("added_p50_1conn", "added p50 at 1 connection (vs direct)", "ms", 0.3, _get("rr", "c1", "added_p50_ms")),
    Target("added_p99_1conn", "added p99 at 1 connection (vs direct)", "ms", 1.0, _get("rr", "c1", "added_p99_ms")),
    Target(
        "throughput_ratio_64",
        "throughput at 64 connections, sidecar / nginx",
        "ratio",
        0.20,
        _get("rr", "c64", "sidecar_over_nginx"),
        higher_is_better=True,
    ),
    Target(
        "sse_ttfb_added", "SSE time to first byte added, one stream", "ms", 1.0, _get("sse", "single", "added_p50_ms")
    ),
    Target(
        "sse_burst_added_p50",
        "SSE burst of 100 streams, added p50",
        "ms",
        10.0,
        _get("sse", "burst_100", "added_p50_ms"),
    ),
    Target("held_1000_peak_rss", "1,000 streams held at once, peak RSS (all processes)", "MB", 100.0, _held_ok(1000)),
    Target("idle_rss", "idle RSS (all processes)", "MB", 70.0, _get("idle", "rss_total_mb")),
    Target("ready", "process start to /readyz 200", "s", 1.0, _get("ready_s")),
    Target("idp_calls", "identity-provider calls minus one per token lifetime", "calls", 0.0, _idp_exact),
    Target(
        "sparse_added_p50_5ms",
        "added p50 with a 5 ms pause before each request",
        "ms",
        None,
        _get("sparse", "gap_5ms", "added_p50_ms"),
    ),
    Target(
        "sparse_added_p50_50ms",
        "added p50 with a 50 ms pause before each request",
        "ms",
        None,
        _get("sparse", "gap_50ms", "added_p50_ms"),
    ),
    Target("cpu_sidecar", "sidecar CPU per 1,000 proxied requests", "s", None, _get("cpu", "sidecar_s_per_1000")),
    Target("cpu_nginx", "nginx CPU per 1,000 proxied requests", "s", None, _get("cpu", "nginx_s_per_1000")),
)


def judge(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [target.judge(summary) for target in TARGETS]


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(summary: dict[str, Any]) -> str:
    lines = ["", "request/response (wrk, POST chat completion)"]
    lines.append(
        f"  {'conns':>5} {'variant':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
        f"{'+p99 ms':>8} {'errors':>6}"
    )
    for key, level in summary["rr"].items():
        for variant in ("direct", "nginx", "sidecar"):
            row = level[variant]
            added50 = added99 = ""
            if variant != "direct":
                added50 = _fmt(row["p50_ms"] - level["direct"]["p50_ms"], 3)
                added99 = _fmt(row["p99_ms"] - level["direct"]["p99_ms"], 3)
            lines.append(
                f"  {key[1:]:>5} {variant:<8} {row['rps']:>9.0f} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} "
                f"{added50:>8} {added99:>8} {row['errors']:>6}"
            )
        lines.append(f"  {'':>5} sidecar/nginx throughput {level['sidecar_over_nginx']:.1%}")
    sparse = summary.get("sparse", {})
    if sparse:
        lines += ["", "sparse requests (one kept-alive connection, a pause before each request; reported)"]
    for key, row in sparse.items():
        lines.append(
            f"  {key.removeprefix('gap_')} pause: p50 direct {row['direct_p50_ms']:.3f} ms, "
            f"nginx {row['nginx_p50_ms']:.3f} ms, sidecar {row['sidecar_p50_ms']:.3f} ms; "
            f"added: nginx {row['nginx_added_p50_ms']:.3f} ms, "
            f"sidecar {row['added_p50_ms']:.3f} ms ({row['requests']} each)"
        )
    sse = summary["sse"]
    lines += ["", "streaming (SSE through the upstream emulator)"]
    for key in ("single", "single_fresh"):
        one = sse[key]
        lines.append(
            f"  one stream TTFB p50 ({one['how']}): direct {one['direct_p50_ms']:.2f} ms, "
            f"nginx {one['nginx_p50_ms']:.2f} ms, sidecar {one['sidecar_p50_ms']:.2f} ms; "
            f"added: nginx {one['nginx_added_p50_ms']:.2f} ms, sidecar {one['added_p50_ms']:.2f} ms "
            f"({one['streams']} each)"
        )
    b = sse["burst_100"]
    lines.append(
        f"  burst of 100 TTFB p50: direct {b['direct_p50_ms']:.1f} ms, nginx {b['nginx_p50_ms']:.1f} ms, "
        f"sidecar {b['sidecar_p50_ms']:.1f} ms; added: nginx {b['nginx_added_p50_ms']:.1f} ms, "
        f"sidecar {b['added_p50_ms']:.1f} ms (median of {b['rounds']} rounds)"
    )
    for count in (100, 1000):
        held = sse.get(f"held_{count}")
        if held:
            lines.append(
                f"  {count} streams held: {held['completed']} completed, {held['peak_open']} open at once, "
                f"peak RSS {held['peak_rss_total_mb']:.1f} MB ({held['processes']} process(es))"
            )
    idle = summary["idle"]
    per = ", ".join(f"{v:.1f}" for v in idle["rss_per_process_mb"])
    lines += [
        "",
        f"idle RSS {idle['rss_total_mb']:.1f} MB (per process: {per}; PSS total {idle['pss_total_mb']:.1f} MB)",
    ]
    lines.append(f"ready {summary['ready_s']:.3f} s after start")
    cpu = summary["cpu"]
    lines.append(
        f"CPU per 1,000 proxied requests: sidecar {cpu['sidecar_s_per_1000']:.3f} s, "
        f"nginx {cpu['nginx_s_per_1000']:.3f} s"
    )
    idp = summary["identity_provider"]
    lines.append(f"identity-provider token requests: {idp['token_requests']} (expected {idp['expected']})")
    lines += ["", "targets"]
    for row in summary["targets"]:
        limit = "" if row["limit"] is None else f"{row['comparison']} {row['limit']:g} {row['unit']}"
        lines.append(f"  [{row['status']:^8}] {row['label']}: {_fmt(row['value'], 3)} {row['unit']} {limit}")
    return "\n".join(lines)
