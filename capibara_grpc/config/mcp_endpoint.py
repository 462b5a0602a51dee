"""Where the gateway's process serves MCP over HTTP: the edge's route and the loopback ports.
Here, with the configuration, because validation, the Envoy config, `capibara up` and the
Kubernetes manifests need them without loading the MCP SDK."""

from __future__ import annotations

# The edge's route and the gateway's HTTP app share the path.
PATH = "/mcp"
# Default distance of the MCP port from the gateway's gRPC port (gateway.mcp_port = 0).
PORT_OFFSET = 10


def http_port(config, gateway_port: int | None = None) -> int:
    """The MCP port of the gateway listening on `gateway_port` (default: the configured one)."""
    if config.gateway.mcp_port:
        return config.gateway.mcp_port
    return (gateway_port or config.services.endpoint("gateway").port) + PORT_OFFSET


def http_addresses(config, gateway_addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Envoy's endpoints of the MCP cluster, one per gateway (host, gRPC port)."""
    if config.gateway.mcp_port:
        return [(gateway_addresses[0][0], config.gateway.mcp_port)]
    return [(host, port + PORT_OFFSET) for host, port in gateway_addresses]
