"""edgefleet: small language models across a fleet of edge devices.

This package holds what both daemons share: the generated gRPC stubs
(``edgefleet.v1``), error types, default addresses, logging set-up and the CLI.
"""

__version__ = "0.1.0"
