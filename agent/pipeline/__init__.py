"""The pipeline: poll scheduling and device state, decode, and batching into the store (drivers → decode →
alarms → store)."""
