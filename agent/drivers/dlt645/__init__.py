"""DL/T 645-2007 electricity meters on an RS-485 bus."""

from agent.drivers.dlt645 import driver  # noqa: F401  (registers the driver)
