"""Plain Python types of the inference service itself (the shared chat types are in
capibara_grpc.chat_types)."""

from __future__ import annotations

from dataclasses import dataclass

# Compatibility re-export: the chat types moved to capibara_grpc.chat_types. Imported from here
# only by modules not yet switched; to be deleted once none is left.
from capibara_grpc.chat_types import (  # noqa: F401
    FINISH_REASONS,
    ROLES,
    Finished,
    GenerateFn,
    Message,
    SamplingParams,
    Token,
)


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
