"""Workload identity: the mesh CA and the certificates it issues to each replica's sidecar."""
