"""Edge monitoring agent: field devices → local alarms → durable store → MQTT uplink to the county platform."""

__version__ = "0.1.0"
