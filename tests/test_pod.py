"""`workers: N` seen as one pod (sidecar/pod.py): the parent's admin listener, one scrape adding up every
worker, a silent worker that cannot make counters go backwards, listeners that cannot open."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
from harness import BODY, CHAT, config_for, free_port, run_cli, write_config
from processes import accepted_by, post_raw, start_workers, stop, worker_pids
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sidecar_emulators import Stack

CHAT_200 = {"method": "POST", "code": "200", "route": "chat.completions"}


async def scrape(http: aiohttp.ClientSession, admin: str) -> dict[str, list[Sample]]:
    async with http.get(admin + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict[str, list[Sample]], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in families.get(family, []) if s.name == sample and s.labels == labels]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def requests_on_each_worker(port: int, pids: list[int], per_worker: int) -> dict[int, int]:
    """`per_worker` chat requests on a connection held by each worker; returns answers per worker pid."""
    held: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    opened: list[asyncio.StreamWriter] = []
    try:
        for _ in range(64):  # new connections until the kernel has handed one to every worker (SO_REUSEPORT)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append(writer)
            owner = await accepted_by(port, writer.get_extra_info("sockname")[1], pids)
            held.setdefault(owner, (reader, writer))
            if len(held) == len(pids):
                break
        assert set(held) == set(pids), f"connections landed on {set(held)}, workers are {pids}"
        answered = {}
        for pid, (reader, writer) in held.items():
            statuses = [(await post_raw(reader, writer, port))[0] for _ in range(per_worker)]
            assert statuses == [200] * per_worker
            answered[pid] = per_worker
        return answered
    finally:
        for writer in opened:
            writer.close()


async def test_one_scrape_of_the_admin_port_shows_the_whole_pod(stack: Stack, tmp_path: Path) -> None:
    admin = f"http://127.0.0.1:{free_port()}"
    process, url = await start_workers(stack, tmp_path, workers=2, admin={"port": int(admin.rsplit(":", 1)[1])})
    port = int(url.rsplit(":", 1)[1])
    pids = worker_pids(process.pid)
    try:
        async with aiohttp.ClientSession() as http:
            answered = await requests_on_each_worker(port, pids, per_worker=5)
            first = await scrape(http, admin)
            # every worker's requests in one scrape (each worker alone would show 5)
            assert value(first, "sidecar_requests", "sidecar_requests_total", **CHAT_200) == sum(answered.values())
            assert sum(answered.values()) == 10
            assert value(first, "sidecar_workers", "sidecar_workers", answered="true") == 2
            assert value(first, "sidecar_workers", "sidecar_workers", answered="false") == 0
            # the parent's own call, once: not once per worker that heard of it
            calls = {"flow": "client_credentials", "outcome": "success"}
            assert value(first, "sidecar_token_acquisitions", "sidecar_token_acquisitions_total", **calls) == 1
            assert stack.entra.token_requests == 1
            assert value(first, "sidecar_token_expires_in_seconds", "sidecar_token_expires_in_seconds") > 60
            # the pod's memory: the parent's and the workers' together
            together = sum(rss_bytes(pid) for pid in (process.pid, *pids))
            reported = value(first, "process_resident_memory_bytes", "process_resident_memory_bytes")
            assert 0.8 * together < reported < 1.25 * together, (reported, together)
            assert reported > 1.5 * max(rss_bytes(pid) for pid in (process.pid, *pids))
            assert value(first, "process_open_fds", "process_open_fds") > 3 * 3
            # a scrape again: the same counts, whichever process answers what
            again = await scrape(http, admin)
            assert value(again, "sidecar_requests", "sidecar_requests_total", **CHAT_200) == 10
            # the admin listener is the parent's: health and readiness of the pod, never the proxy
            async with http.get(admin + "/readyz") as ready:
                assert (ready.status, (await ready.json())["status"]) == (200, "ready")
            seen = len(stack.upstream.requests)
            async with http.post(admin + CHAT, data=BODY) as refused:
                assert refused.status == 404
            assert len(stack.upstream.requests) == seen
            async with http.get(url + "/metrics") as main_metrics:  # scrapers go to the admin port
                assert main_metrics.status == 404
    finally:
        code, lines = await stop(process)
    assert code == 0
    assert any("metrics of the whole pod" in line for line in lines)


async def test_a_silent_worker_counts_with_its_last_figures(stack: Stack, tmp_path: Path) -> None:
    """A worker that cannot answer (stopped, or its loop stuck) must neither hold up the scrape nor make the pod's
    counters go backwards (Prometheus would read a reset and invent a spike)."""
    admin = f"http://127.0.0.1:{free_port()}"
    process, url = await start_workers(stack, tmp_path, workers=2, admin={"port": int(admin.rsplit(":", 1)[1])})
    pids = worker_pids(process.pid)
    stopped: int | None = None
    try:
        await requests_on_each_worker(int(url.rsplit(":", 1)[1]), pids, per_worker=3)
        async with aiohttp.ClientSession() as http:
            assert value(await scrape(http, admin), "sidecar_requests", "sidecar_requests_total", **CHAT_200) == 6
            stopped = pids[0]
            os.kill(stopped, signal.SIGSTOP)
            began = asyncio.get_running_loop().time()
            silent = await scrape(http, admin)
            assert asyncio.get_running_loop().time() - began < 5  # bounded by the answer timeout (1 s)
            assert value(silent, "sidecar_requests", "sidecar_requests_total", **CHAT_200) == 6
            assert value(silent, "sidecar_workers", "sidecar_workers", answered="false") == 1
            os.kill(stopped, signal.SIGCONT)
            stopped = None
            back = await scrape(http, admin)  # the late answer to the missed scrape is skipped, not taken for this one
            assert value(back, "sidecar_workers", "sidecar_workers", answered="true") == 2
            assert value(back, "sidecar_requests", "sidecar_requests_total", **CHAT_200) == 6
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        code, _ = await stop(process)
    assert code == 0


async def test_a_taken_port_is_a_config_error_without_a_traceback(stack: Stack, tmp_path: Path) -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    try:
        for section, workers in (("listen", 1), ("admin", 1), ("listen", 2), ("admin", 2)):
            ports = {"listen": {"port": free_port()}, "admin": {"port": free_port()}}
            ports[section]["port"] = taken
            config = config_for(stack, workers=workers, **ports)
            path = write_config(tmp_path / f"{section}-{workers}.yaml", config)
            code, _, err = await run_cli("serve", "--config", path, timeout=30)
            assert code == 2, (section, workers, err)
            assert "Traceback" not in err
            assert (
                f"sidecar: config error: {section}.host/{section}.port: cannot listen on 127.0.0.1:{taken}: "
                f"address already in use; stop what holds the port or choose another ({section}.port)"
            ) in err.splitlines(), err
    finally:
        holder.close()
