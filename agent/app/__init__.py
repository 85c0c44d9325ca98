"""The daemon: wiring of the stages, their start and stop order, and the status and health reports."""
