"""The model servers as the mesh calls them, over HTTP: where each endpoint is, the credentials
and TLS it needs, what kind of server it is and so what it understands, and how its HTTP
failures become mesh errors. Shared by the inference service (chats, health) and the context
service (token counts, context windows)."""
