"""Tokens for pretty JSON, compact JSON and TOON with each delimiter (comma, tab, pipe) on realistic
data, counted by the served model's own tokenizer (llama-server /tokenize on the shipped SmolLM2
GGUF), and the form the context service picks for `data` (the fewest tokens).

    .venv/bin/python benchmarks/toon_tokens.py

A benchmark, not a test: it prints a table.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc.context import toon
from capibara_grpc.supervision import install_check


def datasets() -> dict[str, object]:
    roles, cities = ["admin", "editor", "viewer"], ["Quito", "Madrid", "Lima", "Bogotá", "Sevilla"]
    table = {
        "users": [
            {
                "id": i,
                "name": f"Usuario {i}",
                "email": f"user{i}@example.com",
                "role": roles[i % 3],
                "city": cities[i % 5],
                "active": i % 4 != 0,
                "balance": round(i * 13.37, 2),
            }
            for i in range(100)
        ]
    }
    config = {
        "service": {
            "name": "capibara",
            "version": "1.4.2",
            "replicas": 3,
            "resources": {"cpu": "500m", "memory": "512Mi"},
            "env": {"LOG_LEVEL": "info", "REGION": "eu-west-1", "FEATURE_FLAGS": ["router", "tts"]},
        },
        "database": {"host": "db.internal", "port": 5432, "pool": {"min": 2, "max": 20, "idle_timeout_s": 30}},
        "cache": {"backend": "redis", "ttl_s": 300, "nodes": ["cache-1:6379", "cache-2:6379"]},
        "observability": {"metrics": True, "tracing": {"sampler": "ratio", "ratio": 0.1}},
    }
    api = {
        "status": "ok",
        "page": 1,
        "per_page": 20,
        "total": 57,
        "data": [
            {
                "order_id": f"ORD-{1000 + i}",
                "customer": {"id": 500 + i, "name": f"Cliente {i}"},
                "items": [{"sku": f"SKU-{i}-{j}", "qty": j + 1, "price": 9.99 + j} for j in range(1 + i % 3)],
                "status": ["paid", "shipped", "pending"][i % 3],
                "created_at": f"2026-11-{1 + i:02d}T10:00:00Z",
            }
            for i in range(20)
        ],
        "links": {"next": "/orders?page=2", "prev": None},
    }
    return {"uniform table (100 users)": table, "nested config": config, "API response (20 orders)": api}


def main() -> None:
    with install_check.running_llama_server(install_check.llama_server_binary(), ctx_size=2048) as (url, _process):

        def count(text: str) -> int:
            return len(install_check.post_json(f"{url}/tokenize", {"content": text}, timeout=30)["tokens"])

        print(f"\nTokens counted by SmolLM2-135M's tokenizer (llama-server /tokenize), {time.strftime('%Y-%m-%d')}")
        delimiters = toon.DELIMITER_NAMES
        print(
            f"{'data':28} {'pretty JSON':>12} {'compact JSON':>13}"
            + "".join(f" {'TOON ' + n:>10}" for n in delimiters.values())
            + f" {'picked':>22}"
        )
        for name, value in datasets().items():
            pretty = count(json.dumps(value, indent=2, ensure_ascii=False))
            compact = count(toon.compact_json(value))
            tokens = {n: count(toon.encode(value, toon.EncodeOptions(delimiter=d))) for d, n in delimiters.items()}
            best = min(tokens, key=tokens.get)
            picked = (
                f"TOON {best} {100 * (tokens[best] / compact - 1):+.1f}%" if tokens[best] <= compact else "compact JSON"
            )
            print(
                f"{name:28} {pretty:12d} {compact:13d}"
                + "".join(f" {t:10d}" for t in tokens.values())
                + f" {picked:>22}"
            )


if __name__ == "__main__":
    main()
