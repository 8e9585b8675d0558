"""Command line of nfq_tcpcrypt: `run`, `sessions`, `lab` (DESIGN.md §6)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .shell.control import DEFAULT_PATH


def _int(text: str) -> int:
    return int(text, 0)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="nfq-tcpcrypt", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground until SIGINT/SIGTERM")
    run.add_argument("--mode", choices=["host"], default="host")
    run.add_argument(
        "--queue-num", type=int, default=7100, help="inbound queue N; outbound is N+1 (default 7100)"
    )
    run.add_argument("--mark", type=_int, default=0x7463, help="SO_MARK of injected packets (default 0x7463)")
    run.add_argument("--control", default=DEFAULT_PATH, help=f"control socket (default {DEFAULT_PATH})")
    run.add_argument("--keylog", metavar="FILE", help="append session secrets to FILE (mode 0600)")
    run.add_argument("--tep", default="x25519", help="TEPs offered, most preferred first (default x25519)")
    run.add_argument("--aead", default="aes128gcm", help="AEADs offered (default aes128gcm)")
    run.add_argument(
        "--fail-closed", action="store_true", help="no --queue-bypass: TCP stops while the daemon is down"
    )
    run.add_argument("--ipv6", action="store_true", help="also queue IPv6 TCP (ip6tables)")
    run.add_argument(
        "--pass-through", action="store_true", help="accept every packet unchanged (benchmark baseline)"
    )
    run.add_argument("--log-level", dest="sub_log_level", default=None, help="DEBUG, INFO, WARNING, ERROR")

    sessions = sub.add_parser("sessions", help="show the daemon's session table")
    sessions.add_argument("--json", action="store_true", help="print a JSON array")
    sessions.add_argument("--control", default=DEFAULT_PATH)

    rules_cmd = sub.add_parser("rules", help="show or remove the daemon's iptables rules (after a SIGKILL)")
    rules_cmd.add_argument("action", choices=["show", "remove"])
    rules_cmd.add_argument("--queue-num", type=int, default=7100, help="the killed daemon's --queue-num")
    rules_cmd.add_argument(
        "--control", default=DEFAULT_PATH, help="refuse to remove while this socket answers"
    )

    lab = sub.add_parser("lab", help="demo: two network namespaces, an encrypted HTTP transfer, checks")
    lab.add_argument("--size", type=int, default=4 * 1024 * 1024, help="bytes to transfer (default 4 MiB)")
    lab.add_argument("--keep", metavar="DIR", help="keep the capture, key logs and daemon logs in DIR")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from .core.errors import ConfigError
    from .shell.daemon import DaemonOptions, run_daemon
    from .shell.rules import RulesError

    options = DaemonOptions(
        mode=args.mode,
        queue_num=args.queue_num,
        mark=args.mark,
        control=args.control,
        keylog=args.keylog,
        teps=args.tep,
        aeads=args.aead,
        fail_closed=args.fail_closed,
        ipv6=args.ipv6,
        pass_through=args.pass_through,
    )
    try:
        return run_daemon(options)
    except (ConfigError, RulesError, OSError) as exc:
        logging.getLogger("nfq_tcpcrypt").error("cannot run: %s", exc)
        return 1


def _cmd_sessions(args: argparse.Namespace) -> int:
    from .shell.control import query

    try:
        table = query(args.control, "sessions")
    except OSError as exc:
        print(f"nfq-tcpcrypt: cannot reach the daemon at {args.control}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    columns = [
        "local",
        "remote",
        "state",
        "role",
        "tep",
        "aead",
        "resumed",
        "bytes_in",
        "bytes_out",
        "session_id",
    ]
    rows = [[str(entry.get(col, "")) for col in columns] for entry in table]
    widths = [max([len(col), *(len(row[i]) for row in rows)]) for i, col in enumerate(columns)]
    print("  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no sessions)")
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    from .shell import rules
    from .shell.control import query

    if args.action == "show":
        for family in ("ipv4", "ipv6"):
            if rules.available(family):
                for line in rules.leftovers(family):
                    print(f"{family}: {line}")
        return 0
    try:
        query(args.control, "ping", timeout=2.0)
    except (OSError, ValueError):
        pass
    else:
        print(f"nfq-tcpcrypt: a daemon answers on {args.control}; stop it instead", file=sys.stderr)
        return 1
    problems = rules.remove_stale(args.queue_num)
    for problem in problems:
        print(f"nfq-tcpcrypt: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_lab(args: argparse.Namespace) -> int:
    from .lab import run_lab

    return run_lab(size=args.size, keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nfq-tcpcrypt` console script."""
    args = build_parser().parse_args(argv)
    level = getattr(args, "sub_log_level", None) or args.log_level
    _setup_logging(level)
    handlers = {"run": _cmd_run, "sessions": _cmd_sessions, "rules": _cmd_rules, "lab": _cmd_lab}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
