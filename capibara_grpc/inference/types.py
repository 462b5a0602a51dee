"""Plain Python types of the inference service itself (the chat types every service shares are
in capibara_grpc.chat.types)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelStatus:
    """One model's backend as the inference service sees it (ListModels, health)."""

    model_id: str
    backend_url: str
    protocol: str
    chat_template: str
    healthy: bool
    status: str
    context_window: int = 0
