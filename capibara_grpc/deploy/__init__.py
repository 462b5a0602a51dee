"""Deployment artefacts generated from the mesh config (Kubernetes manifests)."""
