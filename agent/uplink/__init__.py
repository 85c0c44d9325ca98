"""The uplink: MQTT session (paho glue), the sender (live window and rate-bounded backlog) and the wire
encoding of the contract in docs/protocol.md."""
