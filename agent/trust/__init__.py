"""Trust between the agent and the platform: canonical bytes of a JSON message, Ed25519 keys and key files,
signed messages. Sits low in the layers (configuration and control import it) and imports nothing of ours but
the error hierarchy; it never reads a configuration and never touches the network.
"""
