"""What the tests (and the benchmarks) share: a real mesh started as a child process (mesh), gRPC
channels to it (channels), an SSE reader (sse), WAV helpers (audio), llama-server slot watching
(llama_slots), and real PostgreSQL and Redis servers (stores)."""
