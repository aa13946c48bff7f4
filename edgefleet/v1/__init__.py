"""Generated protocol buffer and gRPC stubs for edgefleet.v1 (``make proto``)."""
