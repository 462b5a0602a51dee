"""Compatibility re-export: the conversions moved to capibara_grpc.chat_convert. Imported from
here only by modules not yet switched; to be deleted once none is left."""

from capibara_grpc.chat_convert import (  # noqa: F401
    FINISH_FROM_PB,
    FINISH_TO_PB,
    ROLE_FROM_PB,
    ROLE_TO_PB,
    chunk_from_pb,
    chunk_to_pb,
    messages_from_pb,
    messages_to_pb,
    params_from_pb,
    params_to_pb,
    timings_to_pb,
    usage_to_pb,
)
