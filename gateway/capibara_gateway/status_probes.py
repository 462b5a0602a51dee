"""What the status sampler reads besides grpc.health.v1 (capibara_gateway/status.py keeps it):

- the inference service's queue depth and active generations per model, from its own Prometheus
  /metrics (capibara_queue_depth, capibara_active_generations), which is where admission counts
  them, whether inference runs in this process or in another (--split);
- each server of a model whose replicas the inference service balances (backend.balance:
  affinity): in-flight chats, pinned conversations, affinity hits, fallbacks and the last choice,
  from the same /metrics (capibara_replica_*);
- the resident memory (VmRSS) of the mesh's processes on this host: each process is found by the
  port it listens on (the services' gRPC ports, the Envoy edge, each model server's port), from
  /proc/net/tcp{,6} and /proc/<pid>/fd, so no pid file is needed and a restarted llama-server is
  found again. Processes of other hosts (or other users) are not shown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from capibara_gateway.health import MeshHealth
from capibara_gateway.status import MeshStatus, Sample
from capibara_grpc.config import MeshConfig
from capibara_grpc.config.schema import url_host_port

log = logging.getLogger(__name__)
PROC = pathlib.Path("/proc")
SAMPLE_INTERVAL_S = 2.0
# Memory changes slowly and finding the processes walks /proc: every few samples only.
MEMORY_EVERY = 3
_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


def parse_load(text: str) -> dict[str, tuple[float, float]]:
    """model -> (queue depth, active generations) from a Prometheus text exposition."""
    load: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        column = {"capibara_queue_depth": 0, "capibara_active_generations": 1}.get(family.name)
        if column is None:
            continue
        for sample in family.samples:
            load.setdefault(sample.labels.get("model", ""), [0.0, 0.0])[column] += sample.value
    return {model: (values[0], values[1]) for model, values in load.items()}


# capibara_replica_* family -> the ReplicaStatus field it fills (choices by outcome apart).
_REPLICA_GAUGES = {
    "capibara_replica_in_flight": "in_flight",
    "capibara_replica_pinned_conversations": "pinned",
    "capibara_replica_up": "up",
}
_OUTCOME_FIELDS = {"affinity": "affinity", "fallback": "fallback", "new": "new_conversations"}


def parse_replicas(text: str) -> dict[str, dict]:
    """model -> {"replicas": [ReplicaStatus as a dict, ...], "last_replica": ReplicaChoice as a
    dict or absent}, for the models whose replicas the inference service balances."""
    servers: dict[str, dict[str, dict]] = {}
    last: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("capibara_replica_"):
            continue
        for sample in family.samples:
            model, url = sample.labels.get("model", ""), sample.labels.get("replica", "")
            if not url:
                continue
            replica = servers.setdefault(model, {}).setdefault(url, {"url": url})
            if field := _REPLICA_GAUGES.get(family.name):
                replica[field] = bool(sample.value) if field == "up" else int(sample.value)
            elif family.name == "capibara_replica_choices" and sample.name.endswith("_total"):
                field = _OUTCOME_FIELDS.get(sample.labels.get("outcome", ""))
                if field:
                    replica[field] = replica.get(field, 0) + int(sample.value)
            elif family.name == "capibara_replica_last_choice_timestamp_seconds":
                if sample.value > last.get(model, {}).get("at", 0.0):
                    last[model] = {"url": url, "outcome": sample.labels.get("outcome", ""), "at": sample.value}
    result = {}
    for model, replicas in servers.items():
        result[model] = {"replicas": [replicas[url] for url in sorted(replicas)]}
        if model in last:
            result[model]["last_replica"] = last[model]
    return result


async def scrape_load(session: aiohttp.ClientSession, url: str) -> tuple[dict[str, tuple[float, float]], dict]:
    """(load per model, replicas per model) from the inference service's /metrics."""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as response:
        response.raise_for_status()
        text = await response.text()
    return parse_load(text), parse_replicas(text)


def listening_inodes(ports: set[int]) -> dict[str, int]:
    """socket inode -> port, of the TCP sockets listening on one of `ports`."""
    found = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == _LISTEN and port in ports:
                found[fields[9]] = port
    return found


def pids_by_port(ports: set[int]) -> dict[int, int]:
    """port -> pid of the process listening on it (of the processes this user may look into)."""
    inodes = listening_inodes(ports)
    found: dict[int, int] = {}
    if not inodes:
        return found
    for proc in PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in os.scandir(proc / "fd"):
                target = os.readlink(fd.path)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    found[inodes[target[8:-1]]] = int(proc.name)
        except OSError:  # gone, or another user's
            continue
        if len(found) == len(inodes):
            break
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def mesh_ports(config: MeshConfig) -> dict[int, str]:
    """port -> what listens there: each deployed service, Envoy, each model server on this host."""
    ports = {config.edge.port: "envoy"}
    if config.services.host in _LOOPBACK:
        for name in config.deployed_services:
            ports[config.services.endpoint(name).port] = name
    for model_id, model in config.models.items():
        for url in model.server_urls:
            host, port = url_host_port(url)
            if host in _LOOPBACK:
                ports.setdefault(port, f"model server {model_id}")
    return ports


def memory(config: MeshConfig) -> dict[str, tuple[int, float]]:
    """process name -> (pid, RSS MiB); services sharing a process are named together."""
    ports = mesh_ports(config)
    names: dict[int, list[str]] = {}
    for port, pid in pids_by_port(set(ports)).items():
        names.setdefault(pid, []).append(ports[port])
    result = {}
    for pid, owned in names.items():
        rss = rss_mib(pid)
        if rss is not None:
            result[" + ".join(sorted(owned))] = (pid, rss)
    return result


async def run_sampler(status: MeshStatus, health: MeshHealth, config: MeshConfig) -> None:
    """Every SAMPLE_INTERVAL_S: health, inference load, and (every MEMORY_EVERY) memory."""
    metrics_url = ""
    if "inference" in config.deployed_services:
        port = config.services.endpoint("inference").metrics
        metrics_url = f"http://{config.services.host}:{port}/metrics"
    tick = 0
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                status.record_health(await health.check())
            except Exception as exc:  # noqa: BLE001 - the sampler must outlive any failure
                log.warning("status sampler: health check failed: %s", exc)
                status.record_unreachable(f"health check failed: {type(exc).__name__}")
            sample = Sample()
            if metrics_url:
                try:
                    sample.load, sample.replicas = await scrape_load(session, metrics_url)
                except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                    log.debug("status sampler: %s unreadable: %s", metrics_url, exc)
            if tick % MEMORY_EVERY == 0:
                sample.memory = await asyncio.to_thread(memory, config)
            status.record_sample(sample)
            tick += 1
            await asyncio.sleep(SAMPLE_INTERVAL_S)
