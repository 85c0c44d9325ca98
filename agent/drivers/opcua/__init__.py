"""OPC UA servers, read by polling or by subscription."""

from agent.drivers.opcua import driver  # noqa: F401  (registers the driver)
