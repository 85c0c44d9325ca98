"""Protocol drivers, one module each, found through `agent.drivers.registry`."""
