"""The `edge-agent` command line: one module per command group; the daemon is `edge-agent run`."""
