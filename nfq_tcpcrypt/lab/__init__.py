"""The lab: namespace topologies and traffic drivers (`net`), the `nfq-tcpcrypt lab` demo (`demo`),
the `duplex` traffic program and the in-memory TCP model (`tcpmodel`) for tests and benchmarks.

Never imported by the daemon's path (`nfq-tcpcrypt run`, shell, core): tests/core/test_import_rule.py.
"""
