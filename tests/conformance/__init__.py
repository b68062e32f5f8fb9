"""Differential conformance suite: the real Envoy and our sidecar on one bootstrap (see harness.py)."""
