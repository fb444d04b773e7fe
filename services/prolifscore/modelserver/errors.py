"""The one failure type of the model server: a gRPC status code and message as TF Serving words
them, which the gRPC services abort with and the REST API maps to its HTTP codes."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request failure with the gRPC status code TF Serving would answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
