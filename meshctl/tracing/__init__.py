"""Distributed tracing: the mesh's Zipkin-compatible collector and `meshctl trace`."""
