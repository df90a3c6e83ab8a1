"""The follow/fan relationship service: gRPC follow.v1 over PostgreSQL, plus the v4 shim."""
