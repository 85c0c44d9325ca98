"""Protocol drivers, one package per protocol, found through `agent.drivers.registry`; `links` holds the
serial and TCP byte links they share."""
