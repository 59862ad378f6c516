"""Wire-compatible subset of etcd v3 API messages used by the benchmark (generated kv_pb2)."""
