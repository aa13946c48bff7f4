"""The coordinator: fleet membership in etcd, placement, sessions, streaming."""
