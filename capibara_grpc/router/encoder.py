"""Compatibility re-export: the sentence encoder moved to capibara_grpc.sentence_encoder and the
micro-batcher to capibara_grpc.router.batching. Imported from here only by modules not yet
switched; to be deleted once none is left."""

from capibara_grpc.router.batching import MicroBatcher  # noqa: F401
from capibara_grpc.sentence_encoder import MINILM, SentenceEncoder, resolve_encoder, shared_encoder  # noqa: F401
