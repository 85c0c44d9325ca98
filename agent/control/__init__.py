"""The control plane, beside the pipeline: commands from the platform and the local CLI, the control socket,
and the actions they may take (reset a latched alarm, set the production state)."""
