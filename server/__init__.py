"""odeserve's gRPC server: ``python -m server``."""
