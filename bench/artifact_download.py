"""Devices downloading an artifact from the service, against aiohttp's static file handler (and nginx).

    .venv/bin/python bench/artifact_download.py [--clients 200] [--size-mb 20] [--rounds 3]

Starts the service (its embedded broker, SQLite), uploads a random artifact of --size-mb MB,
registers --clients devices in one group and submits one job of a workflow naming the artifact,
so every device has a pending child job and its own link (the URL its head carries:
/v1/device-artifact/{sha256}?device=&job=&token=, the token made with the service's own key, as
the head's). A second process serves the same file from the artifact directory with aiohttp's
static file handler (`add_static`, which also uses sendfile), and, when the `nginx` binary is
installed, a third serves it with nginx. Then this process runs --clients concurrent aiohttp
clients, each downloading the whole file once (one connection each), in rounds that alternate
between the servers (so a change in the machine's load hits each), after a warm-up round that
checks every server's bytes against the SHA-256; the figure is each server's best aggregate
throughput, and the ratio service / static (the goal is at least 0.8).

The clients run in one Python process on the same machine, so on a small machine they, not the
servers, may be the limit; the ratio stays meaningful because both servers meet the same clients.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import aiohttp
from fleet import REPO, register_fleet, result  # first: puts the repo on sys.path

from ota_bridge.artifact_links import ArtifactLinks
from ota_bridge.signing import load_or_create
from tests.support.artifact_http import uploaded
from tests.support.mosquitto import free_port
from tests.support.processes import Service, wait_until

STATIC_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/files", sys.argv[2])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /files/ {{ alias {files}/; }}
    }}
}}
"""
READ_BYTES = 1 << 20


async def _download(session: aiohttp.ClientSession, url: str, digest: bool = False) -> tuple[int, str]:
    """(bytes read, their SHA-256 if asked) of one GET."""
    hasher = hashlib.sha256() if digest else None
    size = 0
    async with session.get(url) as response:
        if response.status != 200:
            raise SystemExit(f"GET {url.split('?')[0]} answered {response.status}")
        while chunk := await response.content.read(READ_BYTES):
            size += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
    return size, hasher.hexdigest() if hasher else ""


async def _round(urls: list[str], expected: int) -> float:
    """Every client downloads its URL once, all at once; the aggregate bytes per second."""
    connector = aiohttp.TCPConnector(limit=len(urls))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        sizes = await asyncio.gather(*(_download(session, url) for url in urls))
        elapsed = time.perf_counter() - start
    if any(size != expected for size, _ in sizes):
        raise SystemExit(f"a download was cut short: {sorted({s for s, _ in sizes})} bytes, not {expected}")
    return expected * len(urls) / elapsed


async def _check(name: str, url: str, sha256: str) -> None:
    async with aiohttp.ClientSession() as session:
        _, got = await _download(session, url, digest=True)
    if got != sha256:
        raise SystemExit(f"{name} served other bytes: SHA-256 {got}, not {sha256}")


async def _compare(targets: dict[str, list[str]], size: int, sha256: str, rounds: int) -> dict[str, float]:
    for name, urls in targets.items():
        await _check(name, urls[0], sha256)
        await _round(urls, size)  # warm-up: page cache, connections, the service's first reads
    best = dict.fromkeys(targets, 0.0)
    for _ in range(rounds):
        for name, urls in targets.items():
            best[name] = max(best[name], await _round(urls, size))
    return best


def device_links(service: Service, clients: int, data: bytes) -> tuple[list[str], str]:
    """One link per device, as each device's head carries it, and the artifact's SHA-256."""
    api = service.api
    register_fleet(api, clients)
    artifact = uploaded(api, "bench.bin", data)
    workflow = api.workflow("true", name="download", Artifacts=[artifact["ArtifactId"]])
    job_id = api.submit(workflow, "download", DeviceGroup="bench")
    links = ArtifactLinks.for_signer(load_or_create(service.data_dir, may_create=False), service.base_url)
    children = api.ok("GET", f"/v1/job/{job_id}/childjobs")
    return [links.url(c["DeviceId"], c["JobId"], artifact["Sha256"]) for c in children], artifact["Sha256"]


@contextmanager
def static_server(files: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", STATIC_SERVER, str(port), str(files)], cwd=REPO)
    try:
        base = f"http://127.0.0.1:{port}/files"
        wait_until(lambda: _listening(port), 10, "the static file server")
        yield base
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def nginx_server(files: Path, workdir: Path) -> Iterator[str | None]:
    binary = shutil.which("nginx")
    if binary is None:
        yield None
        return
    port, where = free_port(), workdir / "nginx"
    where.mkdir()
    (where / "nginx.conf").write_text(NGINX_CONF.format(dir=where, port=port, files=files))
    process = subprocess.Popen([binary, "-p", str(where), "-c", str(where / "nginx.conf"), "-g", "daemon off;"])
    try:
        wait_until(lambda: _listening(port), 10, "nginx")
        yield f"http://127.0.0.1:{port}/files"
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="concurrent downloading devices (default 200)")
    parser.add_argument("--size-mb", type=int, default=20, help="the artifact's size in MB (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per server (default 3)")
    args = parser.parse_args()
    data = os.urandom(args.size_mb * 1_000_000)
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as workdir, ExitStack() as stack:
        service = Service(Path(workdir))
        stack.callback(service.stop)
        service.start()
        links, sha256 = device_links(service, args.clients, data)
        files = service.data_dir / "artifacts"
        targets = {"service": links, "aiohttp static": [f"{stack.enter_context(static_server(files))}/{sha256}"]
                   * args.clients}
        nginx = stack.enter_context(nginx_server(files, Path(workdir)))
        if nginx is not None:
            targets["nginx"] = [f"{nginx}/{sha256}"] * args.clients
        best = asyncio.run(_compare(targets, len(data), sha256, args.rounds))
    report(best, args)


def report(best: dict[str, float], args: argparse.Namespace) -> None:
    print(f"{args.clients} clients each downloading {args.size_mb} MB at once, best of {args.rounds} rounds:")
    for name, rate in best.items():
        print(f"  {name:<16} {rate / 1e6:8.0f} MB/s aggregate")
    print(f"ratio service / aiohttp static: {best['service'] / best['aiohttp static']:.2f} (goal >= 0.8)")
    result("artifact-download", best["service"] / 1e6, "MB/s", best["aiohttp static"] / 1e6,
           best["service"] / best["aiohttp static"], "ratio >= 0.8", raw_unit="MB/s (aiohttp static file)",
           clients=args.clients, size_mb=args.size_mb, nginx_mb_s=best["nginx"] / 1e6 if "nginx" in best else None)
    if "nginx" in best:
        print(f"ratio service / nginx: {best['service'] / best['nginx']:.2f}")
    else:
        print("nginx: not installed, not measured")


if __name__ == "__main__":
    main()
