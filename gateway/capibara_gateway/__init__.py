"""The chat gateway (capibara.gateway.v1 ChatService and MeshService): a package of its own.

It depends on the library (capibara_grpc: config, errors, stubs, the other services' clients) and
never the other way: the library starts it only through the service table's "module:function"
string (capibara_grpc/services.py names `capibara_gateway.wiring:start`).

Modules, in the order a chat goes through them:
- servicer: gRPC <-> plain Python (ChatService, MeshService);
- core: the chat flow, top to bottom (validate, route, answer, speak);
- routing: which model answers (the request's, the router's, the default);
- failover: the next candidate when a model cannot start an answer;
- cache: the response cache (exact and semantic hits, replayed as normal streams);
- speaking: the answer's audio after its text;
- events, protocols: what a chat is made of, and what the gateway needs from other services;
- health: the mesh's aggregated health (GET /health);
- wiring: how a process starts the gateway.
"""
