"""Modbus drivers: TCP, RTU on a serial bus and RTU framed over TCP, sharing one codec and block reader."""

from agent.drivers.modbus import rtu, tcp  # noqa: F401  (each registers its drivers)
