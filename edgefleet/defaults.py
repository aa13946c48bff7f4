"""Default addresses and settings, so every daemon runs with no flags."""

NODE_LISTEN = "127.0.0.1:50061"
COORDINATOR_GRPC = "127.0.0.1:50051"
COORDINATOR_HTTP = "127.0.0.1:8080"
DEFAULT_MODEL = "smollm2-135m"
