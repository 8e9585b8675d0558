"""Sans-I/O protocol core: no sockets, clocks, threads or randomness of its own (docs/architecture.md, "Layers")."""
