"""Strict wire codecs: parse_x(data) -> X and serialize_x(x) -> bytes pairs."""
