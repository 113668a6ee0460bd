"""Cluster mode: calls across many hosts, with Ray as the control plane (issue 20, docs/CLUSTER.md).

`placement` is pure Python (the front's registry and `bench/placement.py` share it); `agent`, `registry`,
`front` and `connect` use Ray and are imported only in cluster mode, so the single-host server never imports
Ray.
"""
