"""The routes file (router.routes_file, config/routes.yaml): routes, their models and examples.

Read by the router service, and checked at startup by every process that runs it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from capibara_grpc.config.parsing import ConfigError, line_of, parse_yaml
from capibara_grpc.config.schema import internal

if typing.TYPE_CHECKING:
    from capibara_grpc.config.schema import MeshConfig


@dataclass
class RouteSpec:
    """A route; its name (shown in routing events) is its key under `routes`."""

    name: str = internal("")
    # The model that answers this kind of message: a model id under `models` of the mesh config.
    model: str = ""
    # Example messages (at least 3; Spanish and English in the shipped file): more and more varied
    # examples = better routing.
    examples: list[str] = field(default_factory=list)
    # Optional words that strongly suggest the route (matched lowercase, without accents).
    keywords: list[str] = field(default_factory=list)


@dataclass
class DefaultRouteSpec:
    """The fallback when no route is confident enough."""

    # The model of messages that no route is confident about.
    model: str = ""
    # Messages that belong to no route (noise), which teach the router when to fall back.
    examples: list[str] = field(default_factory=list)


@dataclass
class RoutesFile:
    """The routes file (router.routes_file)."""

    default: DefaultRouteSpec = field(default_factory=DefaultRouteSpec)
    routes: dict[str, RouteSpec] = field(default_factory=dict)
    source: str = internal("<routes>")


def load_routes(config: MeshConfig) -> RoutesFile:
    """Read and validate the routes file named by router.routes_file."""
    path = config.resolve_path(config.router.routes_file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"{config.source}:{line_of(config.router, 'routes_file')}: router.routes_file '{path}' "
            f"cannot be read ({exc.strerror})"
        ) from exc
    return parse_routes(text, config, source=str(path))


def parse_routes(text: str, config: MeshConfig, source: str = "<routes>") -> RoutesFile:
    routes = parse_yaml(text, RoutesFile, source)
    routes.source = source

    def fail(obj, key, message):
        raise ConfigError(f"{source}:{line_of(obj, key)}: {message}")

    defined = ", ".join(sorted(config.models))
    if not routes.routes:
        fail(routes, "routes", "no routes defined under 'routes'")
    if routes.default.model not in config.models:
        fail(
            routes.default,
            "model",
            f"default.model '{routes.default.model}' is not a model of the mesh (defined: {defined})",
        )
    for name, route in routes.routes.items():
        route.name = name
        if route.model not in config.models:
            fail(route, "model", f"routes.{name}.model '{route.model}' is not a model of the mesh (defined: {defined})")
        if len(route.examples) < 3:
            fail(route, "examples", f"routes.{name} needs at least 3 examples, has {len(route.examples)}")
    return routes
