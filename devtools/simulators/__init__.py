"""Real protocol servers and peers that behave like the plant and the county platform, for tests and demos."""
