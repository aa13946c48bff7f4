"""Local fleets for demos and tests: `edgefleet up`, daemon processes, etcd, OTLP."""
