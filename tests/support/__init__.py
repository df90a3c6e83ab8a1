"""Test harness for the fault tests and the soak: a stoppable PostgreSQL, a write ledger."""
