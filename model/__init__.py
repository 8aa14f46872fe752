"""The network, and nothing else: this package imports torch only."""
