"""The I/O shell around the sans-I/O core: NFQUEUE, raw-socket injection, the event loop, iptables
rules and the control socket (docs/architecture.md: Layers)."""
