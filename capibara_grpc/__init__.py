"""Capibara mesh: a gRPC service mesh for multi-model LLM chat."""
