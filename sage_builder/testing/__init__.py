"""Test helpers that ship with the package (so that benchmarks and other projects can use them)."""

from sage_builder.testing.chat_server import (
    REFUSAL_TEXT,
    BrokenBody,
    ChatServer,
    Delay,
    Drop,
    Refusal,
    Status,
    schema_example,
)

__all__ = ["ChatServer", "Status", "Delay", "Refusal", "BrokenBody", "Drop", "schema_example", "REFUSAL_TEXT"]
