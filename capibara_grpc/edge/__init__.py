"""The Envoy front door: its generated config, TLS material and the proto descriptor it needs."""
