"""The mesh as an MCP server: tools.py builds it, stdio.py runs it for `capibara mcp`, http.py
serves it over Streamable HTTP in the gateway's process, behind the edge's /mcp route. Its path
and ports are part of the configuration (capibara_grpc/config/mcp_endpoint.py)."""
