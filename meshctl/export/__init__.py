"""`meshctl export kube|istio`: a topology as Kubernetes manifests (``plan_export`` then a renderer)."""
