"""The `capibara` command: up, serve, chat, mcp, check, envoy-config, traces (a terminal trace
viewer) and the generators (protoset, k8s, openapi, config-docs). Every command takes `--config
FILE`, before or after its name."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from capibara_grpc import event_loop
from capibara_grpc.config import REPO_ROOT, SERVICE_NAMES, ConfigError, load_config
from capibara_grpc.config.validation import EDGE_FILES

# Commands that open the edge's certificate (Envoy's config; the clients trust it): its files must exist.
READS_EDGE_CERTIFICATE = ("up", "envoy-config", "chat", "mcp")

OPENAPI_PATH = REPO_ROOT / "docs" / "openapi.json"


def _edge_channel(config, target: str | None) -> grpc.aio.Channel:
    """TLS channel to the edge, trusting the mesh's own certificate."""
    from capibara_grpc.edge.tls import ensure_certificate

    cert, _ = ensure_certificate(config)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    return grpc.aio.secure_channel(
        target or f"localhost:{config.edge.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )


async def _chat(args, config) -> int:
    from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc

    request = gateway_pb2.ChatRequest(message=args.message, model=args.model or "")
    if args.max_tokens:
        request.max_tokens = args.max_tokens
    if args.temperature is not None:
        request.temperature = args.temperature
    # A reasoning model's thinking goes to stderr (dimmed on a terminal), so stdout is only the answer.
    dim, plain = ("\033[2m", "\033[0m") if sys.stderr.isatty() else ("", "")
    thinking = answering = False
    calls: dict[int, list[str]] = {}  # a tool call's [name, arguments so far], by index
    async with _edge_channel(config, args.target) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        try:
            async for event in stub.Chat(request, timeout=args.timeout):
                kind = event.WhichOneof("event")
                if kind != "reasoning" and thinking:
                    print(plain, file=sys.stderr, flush=True)
                    thinking = False
                if kind == "routing":
                    print(f"[{event.routing.model_id} · {event.routing.reasoning}]", file=sys.stderr)
                elif kind == "reasoning":
                    if not thinking:
                        # Between answer tokens: on a line of its own.
                        print("\n" if answering else "", f"{dim}[reasoning] ", sep="", end="", file=sys.stderr)
                        thinking = True
                    print(event.reasoning.text, end="", file=sys.stderr, flush=True)
                elif kind == "token":
                    print(event.token.text, end="", flush=True)
                    answering = True
                elif kind == "tool_call":
                    call = calls.setdefault(event.tool_call.index, ["", ""])
                    call[0] = call[0] or event.tool_call.name
                    call[1] += event.tool_call.arguments
                elif kind == "done":
                    for name, arguments in calls.values():
                        print(f"\ntool call: {name}({arguments})", file=sys.stderr)
                    done = event.done
                    reasoning = f", {done.usage.reasoning_tokens} reasoning" if done.usage.reasoning_tokens else ""
                    print(
                        f"\n[{done.usage.completion_tokens} tokens{reasoning}, {done.latency_ms:.0f} ms, "
                        f"{done.timings.tokens_per_second:.0f} tok/s]",
                        file=sys.stderr,
                    )
                elif kind == "error":
                    print(f"\nerror: {event.error.code}: {event.error.message}", file=sys.stderr)
                    return 1
        except grpc.aio.AioRpcError as exc:
            if thinking:
                print(plain, file=sys.stderr)
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


async def _serve(services: list[str], config) -> int:
    from capibara_grpc.server import MeshServers

    servers = await MeshServers(config, services).start()
    print(f"serving {', '.join(services)}", flush=True)
    try:
        await servers.wait()
    finally:
        await servers.stop()
    return 0


CONFIG_HELP = "mesh YAML (default: $CAPIBARA_CONFIG or config/capibara.yaml); before or after the command"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capibara", description="Capibara mesh: multi-model LLM chat over gRPC.")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    # Every command takes --config after its name too (`capibara up --config FILE`). SUPPRESS: a
    # command line without it there keeps the one given before the command.
    config_after = argparse.ArgumentParser(add_help=False)
    config_after.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do; `capibara COMMAND -h` for its options"
    )

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, parents=[config_after])

    up = command("up", "start llama-servers, services and Envoy; Ctrl-C stops all")
    up.add_argument(
        "--split",
        action="store_true",
        help="run each service as its own `capibara serve` process (as deployed), not all in one",
    )
    serve = command("serve", "run one or more services in this process")
    serve.add_argument(
        "services",
        nargs="+",
        choices=SERVICE_NAMES,
        metavar="SERVICE",
        help=f"one or more of: {', '.join(SERVICE_NAMES)}",
    )
    serve.add_argument(
        "--port", type=int, metavar="N", help="listen here instead of the configured port (one service: a replica)"
    )
    serve.add_argument(
        "--metrics-port", type=int, metavar="N", help="Prometheus port of that replica (default: port + 1000)"
    )
    chat = command("chat", "stream an answer in the terminal (through Envoy)")
    chat.add_argument("message", help="what to ask")
    chat.add_argument("--model", help="model id (default: routed)")
    chat.add_argument(
        "--max-tokens", type=int, metavar="N", help="stop after this many tokens (default: the model's defaults)"
    )
    chat.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature (default: the model's defaults)"
    )
    chat.add_argument("--target", metavar="HOST:PORT", help="edge host:port (default: localhost:<edge.port>)")
    chat.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=120.0,
        help="deadline of the whole answer, in seconds (default: %(default)g)",
    )
    mcp = command("mcp", "serve the mesh's tools over MCP on stdio (for desktop assistants), through Envoy")
    mcp.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="edge host:port (default: localhost:<edge.port>); API key: $CAPIBARA_API_KEY",
    )
    mcp.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=300.0,
        help="deadline of a generating tool call, in seconds (default: %(default)g)",
    )
    command("check", "check that the installed llama-server, Envoy, buf and grpcurl run on this machine")
    evaluation = command("router-eval", "router accuracy, confusion and calibration on a labelled set")
    evaluation.add_argument(
        "--set",
        dest="eval_set",
        metavar="FILE",
        help="YAML with queries: [{route, lang, text}] (default: tests/data/router_eval.yaml)",
    )
    envoy = command("envoy-config", "write Envoy's config, descriptor and certificate")
    envoy.add_argument("--print", action="store_true", help="print the YAML")
    envoy.add_argument("--routes", action="store_true", help="list REST paths and the gRPC method of each")
    protoset = command("protoset", "write the descriptor set of every service (for ghz, grpcurl)")
    protoset.add_argument(
        "path",
        nargs="?",
        default=str(REPO_ROOT / ".build" / "capibara.protoset"),
        help="file to write (default: %(default)s)",
    )
    k8s = command("k8s", "write the Kubernetes manifests (kustomize base) from this config")
    k8s.add_argument(
        "--out",
        metavar="DIR",
        default=str(REPO_ROOT / "deploy" / "kubernetes" / "base"),
        help="folder to write (default: %(default)s)",
    )
    k8s.add_argument("--check", action="store_true", help="fail if the files there differ from what the config gives")
    openapi = command("openapi", "write the OpenAPI document of the REST surface (docs/openapi.json)")
    openapi.add_argument("--check", action="store_true", help="fail if the file differs from what the protos give")
    docs = command("config-docs", "write the configuration reference (docs/configuration.md) from the config schema")
    docs.add_argument("--check", action="store_true", help="fail if the file differs from what the schema gives")
    traces = command("traces", "receive OTLP/gRPC traces and print each one as a tree (a viewer without Docker)")
    traces.add_argument(
        "--listen", metavar="HOST:PORT", default="127.0.0.1:4317", help="where to receive (default: %(default)s)"
    )
    traces.add_argument("--json", action="store_true", help="print each span as one JSON line as it arrives")
    return parser


def _config_docs(check: bool) -> int:
    from capibara_grpc.config import docs

    if check:
        stale = docs.check()
        if stale:
            print(stale, file=sys.stderr)
            return 1
        return 0
    docs.write()
    print(docs.DOC_PATH)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config-docs":  # documents the schema; reads no configuration
        return _config_docs(args.check)
    if args.command == "traces":  # a local OTLP receiver; reads no configuration
        from capibara_grpc.telemetry import trace_tree

        return trace_tree.main(args.listen, args.json)

    from capibara_grpc.tracing import configure_logging

    try:
        services = args.services if args.command == "serve" else SERVICE_NAMES
        if args.command in READS_EDGE_CERTIFICATE:
            services = (*services, EDGE_FILES)
        config = load_config(args.config, services=services)
        if args.command == "serve" and args.port:
            if len(args.services) != 1:
                print("--port runs one service: name exactly one", file=sys.stderr)
                return 2
            endpoint = config.services.endpoint(args.services[0])
            endpoint.port, endpoint.metrics_port = args.port, args.metrics_port or args.port + 1000
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command in ("up", "serve"):
        # Text lines on a terminal, JSON lines otherwise (a child's log file, a pipe); `up` also
        # keeps JSON lines of its in-process services in state_dir/logs/capibara.log.
        configure_logging(log_file=config.state_path / "logs" / "capibara.log" if args.command == "up" else None)
    else:
        configure_logging(json_lines=False)

    try:
        return _run(args, config)
    except ConfigError as exc:  # a file the configuration names, read by the command (edge.tls_cert, say)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, config) -> int:
    """The command itself, on a loaded configuration."""
    if args.command == "check":
        from capibara_grpc.supervision import install_check

        return install_check.main()
    if args.command == "up":
        from capibara_grpc.supervision.launcher import run_until_signalled

        return event_loop.run(run_until_signalled(config, split=args.split), config.services.event_loop)
    if args.command == "serve":
        try:
            return event_loop.run(_serve(args.services, config), config.services.event_loop)
        except KeyboardInterrupt:
            return 0
    if args.command == "chat":
        return asyncio.run(_chat(args, config))
    if args.command == "mcp":
        from capibara_grpc.mcp_server import stdio

        return asyncio.run(stdio.serve(lambda: _edge_channel(config, args.target), args.timeout))
    if args.command == "router-eval":
        from capibara_grpc.router import evaluate

        return evaluate.main(config, args.eval_set)
    if args.command == "envoy-config":
        from capibara_grpc.edge import descriptor, envoy_config

        if args.routes:
            for rule in descriptor.http_rules():
                print(f"{rule['verb']:6} {rule['path']:32} -> {rule['grpc_path']}")
            return 0
        path = envoy_config.write(config)
        print(path.read_text() if args.print else path)
        return 0
    if args.command == "k8s":
        import pathlib

        from capibara_grpc.deploy import kubernetes

        out = pathlib.Path(args.out)
        rendered = kubernetes.render(config)
        if args.check:
            stale = [
                name
                for name, text in rendered.items()
                if not (out / name).is_file() or (out / name).read_text() != text
            ]
            stale += [p.name for p in out.glob("*.yaml") if p.name not in rendered]
            if stale:
                print(
                    f"{out} is out of date with {config.source}: {', '.join(sorted(stale))}; run `capibara k8s`",
                    file=sys.stderr,
                )
                return 1
            return 0
        out.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.items():
            (out / name).write_text(text)
        print(out)
        return 0
    if args.command == "protoset":
        import pathlib

        from capibara_grpc.edge import descriptor

        target = pathlib.Path(args.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(descriptor.descriptor_set().SerializeToString())
        print(target)
        return 0
    if args.command == "openapi":
        from capibara_grpc.edge import openapi

        current = openapi.render()
        if args.check:
            if OPENAPI_PATH.read_text() != current:
                print(f"{OPENAPI_PATH} is out of date with the protos: run `capibara openapi`", file=sys.stderr)
                return 1
            return 0
        OPENAPI_PATH.write_text(current)
        print(OPENAPI_PATH)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
