"""Local model server: the embedded stand-in for the `tensorflow/serving` container (same gRPC
API, same model root layout and config file format)."""
