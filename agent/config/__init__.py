"""The configuration: typed models (their field descriptions are the documentation), the YAML loader, and the
point table compiled from a validated configuration."""
