"""Names under which health is published in grpc.health.v1, beyond the services' own full names.

The inference service publishes them; the router (routes around a model that is down) and the
gateway (/health) read them.
"""

from __future__ import annotations

from capibara_grpc.stubs import SERVICE_FULL_NAMES


def model_health_name(model_id: str) -> str:
    """grpc.health.v1 service name under which one model's health is published."""
    return f"{SERVICE_FULL_NAMES['inference']}/{model_id}"
