"""Fast unit tests: no llama-server, no Envoy, no mesh (`make unit`)."""
