"""Offline tools (pcap checks, decoding); scapy is allowed here, never on the packet path."""
