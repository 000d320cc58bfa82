"""The Kubernetes API TEST DOUBLE (not a cluster): a wire-level stand-in the real client talks to (docs/sandbox.md)."""
