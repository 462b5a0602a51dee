"""The tracing settings of a process: the config file's `tracing:` section, with OpenTelemetry's
standard environment variables winning over it, resolved once at startup into `TracingSettings`.

The variables are those of the OpenTelemetry SDK specification ("Environment Variable
Specification" and "OTLP Exporter Configuration"), so a mesh deployed next to other instrumented
software is pointed at the same collector the same way. Only OTLP over gRPC is spoken.
"""

from __future__ import annotations

import os
import typing
import urllib.parse
from dataclasses import dataclass
from importlib import metadata

from capibara_grpc.config.schema import ENV_REFERENCE, TRACE_SAMPLERS, TracingConfig

# Every variable read here, for the docs and for the processes that pass them on.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
INSECURE_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")
_NUMBERS = {
    "schedule_delay_ms": "OTEL_BSP_SCHEDULE_DELAY",
    "max_export_batch_size": "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "max_queue_size": "OTEL_BSP_MAX_QUEUE_SIZE",
    "export_timeout_ms": "OTEL_BSP_EXPORT_TIMEOUT",
}
CAPTURE_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


class TracingSettingsError(ValueError):
    """A tracing setting that cannot be used. `where` is what the message names: the variable,
    or tracing.<key> for a value from the file, whose key (`key`) gives the message its line."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.key = where.removeprefix("tracing.").split(".", 1)[0] if where.startswith("tracing.") else None


@dataclass(frozen=True)
class TracingSettings:
    """What every process of the mesh traces with; `enabled` False when no endpoint is set."""

    enabled: bool
    # host:port of the OTLP/gRPC collector, and whether to speak TLS to it
    target: str
    host: str
    port: int
    tls: bool
    headers: tuple[tuple[str, str], ...]
    sampler: str
    ratio: float
    service_name_prefix: str
    resource_attributes: tuple[tuple[str, str], ...]
    schedule_delay_ms: int
    max_export_batch_size: int
    max_queue_size: int
    export_timeout_ms: int
    capture_content: bool

    def resource(self) -> dict[str, str]:
        """The resource attributes of every process's spans, Envoy's too: the namespace, the
        mesh's version, and the configured ones, which win."""
        namespace = {"service.namespace": self.service_name_prefix} if self.service_name_prefix else {}
        return {**namespace, "service.version": mesh_version(), **dict(self.resource_attributes)}

    def service_name(self, service: str) -> str:
        """The `service.name` of one service's spans (`service`: gateway, router, envoy, ...)."""
        return f"{self.service_name_prefix}-{service}" if self.service_name_prefix else service

    @property
    def parent_based(self) -> bool:
        return self.sampler.startswith("parentbased_")

    @property
    def root_ratio(self) -> float:
        """The fraction of chats without a sampled parent that are traced (what Envoy's
        random_sampling is set to)."""
        base = self.sampler.removeprefix("parentbased_")
        return {"always_on": 1.0, "always_off": 0.0}.get(base, self.ratio)


def mesh_version() -> str:
    try:
        return metadata.version("capibara-mesh")
    except metadata.PackageNotFoundError:
        return "0+unknown"


_DEFAULTS = TracingConfig()
OFF = TracingSettings(
    enabled=False,
    target="",
    host="",
    port=0,
    tls=False,
    headers=(),
    sampler=_DEFAULTS.sampler,
    ratio=_DEFAULTS.sampler_arg,
    service_name_prefix=_DEFAULTS.service_name_prefix,
    resource_attributes=(),
    capture_content=_DEFAULTS.capture_content,
    **{key: getattr(_DEFAULTS, key) for key in _NUMBERS},
)


def _variable(environ: typing.Mapping[str, str], name: str) -> str:
    """A variable's value; "" when unset or blank (the spec: then it is as if unset)."""
    return environ.get(name, "").strip()


def _first(environ: typing.Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if value := _variable(environ, name):
            return name, value
    return None


def parse_endpoint(value: str, where: str, insecure: bool | None = None) -> tuple[str, int, bool]:
    """(host, port, tls) of an OTLP/gRPC endpoint: http://host:port (plaintext), https://host:port
    (TLS), or host:port (plaintext unless `insecure` is False, as the OTLP spec's `insecure`)."""
    if "://" not in value:
        value = ("https://" if insecure is False else "http://") + value
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TracingSettingsError(where, f"{where} '{value}' must be http://host:port or https://host:port")
    if parsed.path not in ("", "/"):
        raise TracingSettingsError(
            where,
            f"{where} '{value}' has a path: OTLP over gRPC takes host:port only (the mesh does not speak OTLP/HTTP)",
        )
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 4317)
    except ValueError:
        raise TracingSettingsError(where, f"{where} '{value}' has no valid port") from None
    tls = parsed.scheme == "https" and insecure is not True
    return parsed.hostname, port, tls


def _pairs(text: str, where: str) -> tuple[tuple[str, str], ...]:
    """key=value,key=value (W3C baggage format, values percent-encoded), as the OTEL_*_HEADERS
    and OTEL_RESOURCE_ATTRIBUTES variables are written."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            # The value may be a secret: never echoed.
            raise TracingSettingsError(where, f"{where}: each entry must be key=value (entry {len(pairs) + 1} is not)")
        pairs.append((key.strip(), urllib.parse.unquote(value.strip())))
    return tuple(pairs)


def _expand(value: str, where: str, environ: typing.Mapping[str, str]) -> str:
    def variable(match) -> str:
        if match.group(1) not in environ:
            raise TracingSettingsError(where, f"{where} refers to ${{{match.group(1)}}}, which is not set")
        return environ[match.group(1)]

    return ENV_REFERENCE.sub(variable, value)


def _bool(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered not in ("true", "false"):
        raise TracingSettingsError(where, f"{where} '{value}' must be true or false")
    return lowered == "true"


def resolve(config: TracingConfig, environ: typing.Mapping[str, str] | None = None) -> TracingSettings:
    """The settings of `config` with the environment's OTEL_* variables winning; OFF when no
    endpoint is set or OTEL_SDK_DISABLED is true. TracingSettingsError names what is wrong."""
    environ = os.environ if environ is None else environ
    if _bool(_variable(environ, "OTEL_SDK_DISABLED") or "false", "OTEL_SDK_DISABLED"):
        return OFF
    insecure_set = _first(environ, INSECURE_VARIABLES)
    insecure = _bool(insecure_set[1], insecure_set[0]) if insecure_set else None
    endpoint = _first(environ, ENDPOINT_VARIABLES) or ("tracing.endpoint", config.endpoint.strip())
    # The sampler, batching and resource are checked even with no endpoint: a wrong value in the
    # file is found before tracing is turned on. What only matters for sending is checked then.
    host, port, tls, headers = "", 0, False, ()
    if endpoint[1]:
        protocol = _first(environ, PROTOCOL_VARIABLES)
        if protocol and protocol[1] != "grpc":
            raise TracingSettingsError(
                protocol[0], f"{protocol[0]} '{protocol[1]}': the mesh exports over OTLP/gRPC only (grpc)"
            )
        host, port, tls = parse_endpoint(endpoint[1], endpoint[0], insecure)
        header_text = _first(environ, HEADER_VARIABLES)
        if header_text:
            headers = _pairs(header_text[1], header_text[0])
        else:
            headers = tuple((k, _expand(v, f"tracing.headers.{k}", environ)) for k, v in config.headers.items())
        headers = tuple((k.lower(), v) for k, v in headers)

    sampler, where = _variable(environ, "OTEL_TRACES_SAMPLER").lower(), "OTEL_TRACES_SAMPLER"
    if not sampler:
        sampler, where = config.sampler, "tracing.sampler"
    if sampler not in TRACE_SAMPLERS:
        raise TracingSettingsError(where, f"{where} '{sampler}' must be one of {', '.join(TRACE_SAMPLERS)}")
    ratio, where = config.sampler_arg, "tracing.sampler_arg"
    if (text := _variable(environ, "OTEL_TRACES_SAMPLER_ARG")) and "traceidratio" in sampler:
        where = "OTEL_TRACES_SAMPLER_ARG"
        try:
            ratio = float(text)
        except ValueError:
            raise TracingSettingsError(where, f"{where} '{text}' must be a number from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise TracingSettingsError(where, f"{where} {ratio} must be from 0 to 1")

    numbers = {}
    for key, variable in _NUMBERS.items():
        value, where = getattr(config, key), f"tracing.{key}"
        if text := _variable(environ, variable):
            if not text.isdigit():
                raise TracingSettingsError(variable, f"{variable} '{text}' must be a whole number")
            value, where = int(text), variable
        if value <= 0:
            raise TracingSettingsError(where, f"{where} must be above 0")
        numbers[key] = value

    resource = dict(config.resource_attributes)
    if text := _variable(environ, "OTEL_RESOURCE_ATTRIBUTES"):
        resource.update(_pairs(text, "OTEL_RESOURCE_ATTRIBUTES"))
    capture = config.capture_content
    if text := _variable(environ, CAPTURE_VARIABLE):
        capture = _bool(text, CAPTURE_VARIABLE)
    if not endpoint[1]:
        return OFF
    return TracingSettings(
        enabled=True,
        target=f"{host}:{port}",
        host=host,
        port=port,
        tls=tls,
        headers=headers,
        sampler=sampler,
        ratio=ratio,
        service_name_prefix=_variable(environ, "OTEL_SERVICE_NAME") or config.service_name_prefix,
        resource_attributes=tuple(resource.items()),
        capture_content=capture,
        **numbers,
    )
