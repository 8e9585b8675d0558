"""Command line of nfq_tcpcrypt: `run`, `status`, `metrics`, `sessions`, `cache`, `rules`, `decode`, `lab`
(README: Usage)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from .shell.control import DEFAULT_PATH
from .tools import decode as decode_tool


def _int(text: str) -> int:
    return int(text, 0)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="nfq-tcpcrypt", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_run_parser(sub)
    _add_control_parsers(sub)
    decode_tool.add_parser(sub)

    lab = sub.add_parser("lab", help="demo: two network namespaces, an encrypted HTTP transfer, checks")
    lab.add_argument("--size", type=int, default=4 * 1024 * 1024, help="bytes to transfer (default 4 MiB)")
    lab.add_argument("--keep", metavar="DIR", help="keep the capture, key logs and daemon logs in DIR")
    return parser


def _add_run_parser(sub: Any) -> None:
    """`run`: the daemon and every option of its config file (README: Usage)."""
    run = sub.add_parser(
        "run",
        help="run the daemon in the foreground until SIGINT/SIGTERM",
        description="Options given here win over the same keys in --config FILE.",
    )
    run.add_argument("--config", metavar="FILE", help="TOML file with the same keys (and [[policy]] tables)")
    run.add_argument(
        "--mode",
        choices=["host", "gateway"],
        default=None,
        help="host: this host's own connections (default); gateway: every TCP connection crossing --outside",
    )
    run.add_argument(
        "--outside",
        metavar="IF[,IF...]",
        default=None,
        help="gateway mode: the interfaces toward the wire (a final + matches a prefix, as in iptables)",
    )
    run.add_argument(
        "--deliver-max",
        type=int,
        default=None,
        metavar="N",
        help="largest plaintext payload per packet toward the local side "
        "(gateway default: smallest inside MTU - 60, or - 80 with --ipv6)",
    )
    run.add_argument(
        "--queue-num", type=int, default=None, help="inbound queue N; outbound is N+1 (default 7100)"
    )
    run.add_argument(
        "--mark", type=_int, default=None, help="SO_MARK of packets injected toward the wire (default 0x7463)"
    )
    run.add_argument(
        "--local-mark",
        type=_int,
        default=None,
        help="SO_MARK of packets injected toward this host's stack (default 0x7464)",
    )
    run.add_argument("--control", default=None, help=f"control socket (default {DEFAULT_PATH})")
    run.add_argument("--keylog", metavar="FILE", help="append session secrets to FILE (mode 0600)")
    run.add_argument("--tep", default=None, help="TEPs offered, most preferred first (default x25519)")
    run.add_argument("--aead", default=None, help="AEADs offered (default aes128gcm)")
    run.add_argument(
        "--rekey-bytes", type=int, default=None, metavar="N", help="new key generation every N bytes sent (0: off)"
    )
    run.add_argument(
        "--keepalive", type=float, default=None, metavar="S", help="probe an idle peer with a rekey after S s (0: off)"
    )
    run.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offer and accept session resumption (default on)",
    )
    run.add_argument(
        "--resume-nonce-len", type=int, default=None, metavar="N",
        help="bytes of fresh resumption nonce, 0..8 (default 8)",
    )
    run.add_argument(
        "--resume-ttl", type=float, default=None, metavar="S",
        help="seconds a cached session stays resumable (default 3600)",
    )
    run.add_argument(
        "--fail-closed",
        action="store_true",
        default=None,
        help="no --queue-bypass: TCP stops while the daemon is down",
    )
    run.add_argument(
        "--require", action="append", metavar="SPEC",
        help="NETWORK, @PORT or NETWORK@PORT: such connections are encrypted or reset (repeatable)",
    )
    run.add_argument(
        "--exclude", action="append", metavar="SPEC",
        help="NETWORK, @PORT or NETWORK@PORT: such connections are never touched (repeatable)",
    )
    run.add_argument("--ipv6", action="store_true", default=None, help="also queue IPv6 TCP (ip6tables)")
    run.add_argument(
        "--pass-through",
        action="store_true",
        default=None,
        help="accept every packet unchanged (benchmark baseline)",
    )
    run.add_argument(
        "--queue-backend", choices=("netfilterqueue", "fast"), default=None,
        help="NFQUEUE binding: fast (default: batched netlink, queue flags) or netfilterqueue",
    )
    run.add_argument(
        "--queue-gso", action=argparse.BooleanOptionalAction, default=None,
        help="fast backend: take GSO super-packets unsegmented (default: on with the fast backend)",
    )
    run.add_argument(
        "--queue-fail-open", action="store_true", default=None,
        help="fast backend with --pass-through: a full queue accepts packets unqueued (NFQA_CFG_F_FAIL_OPEN)",
    )
    run.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="worker processes, each with its own queue pair (default: 1; gateway: one per CPU, of --cpus if given)",
    )
    run.add_argument(
        "--cpus", default=None, metavar="LIST",
        help="run on these CPUs only, e.g. 0 or 0,2-3 (with workers: worker k on the k-th; default: any)",
    )
    run.add_argument(
        "--metrics-file", default=None, metavar="FILE",
        help="rewrite FILE with the Prometheus metrics every few seconds (node_exporter textfile)",
    )
    run.add_argument("--log-level", dest="sub_log_level", default=None, help="DEBUG, INFO, WARNING, ERROR")


def _add_control_parsers(sub: Any) -> None:
    """The commands that ask a running daemon or clean up after one: sessions, status, metrics,
    rules, cache."""
    sessions = sub.add_parser("sessions", help="show the daemon's session table")
    sessions.add_argument("--json", action="store_true", help="print a JSON array")
    sessions.add_argument("--control", default=DEFAULT_PATH)

    status_cmd = sub.add_parser("status", help="version, mode, workers, rules in place and the main counters")
    status_cmd.add_argument("--json", action="store_true", help="print the whole status document as JSON")
    status_cmd.add_argument("--control", default=DEFAULT_PATH)

    metrics_cmd = sub.add_parser("metrics", help="the counters in the Prometheus text format")
    metrics_cmd.add_argument("--control", default=DEFAULT_PATH)

    rules_cmd = sub.add_parser("rules", help="show or remove the daemon's iptables rules (after a SIGKILL)")
    rules_cmd.add_argument("action", choices=["show", "remove"])
    rules_cmd.add_argument("--queue-num", type=int, default=None, help="the killed daemon's --queue-num (7100)")
    rules_cmd.add_argument(
        "--control", default=None, help=f"refuse to remove while this socket answers ({DEFAULT_PATH})"
    )
    rules_cmd.add_argument("--config", metavar="FILE", help="take queue-num and control from the daemon's config")

    cache = sub.add_parser("cache", help="show or flush the resumption cache (never shows secrets)")
    cache_sub = cache.add_subparsers(dest="action", required=True)
    cache_show = cache_sub.add_parser("show", help="cached peers: TEP, AEAD, original role, next index, expiry")
    cache_show.add_argument("--json", action="store_true", help="print a JSON array")
    cache_show.add_argument("--control", default=DEFAULT_PATH)
    cache_flush = cache_sub.add_parser("flush", help="forget cached secrets: the next connections are fresh")
    cache_flush.add_argument("--peer", metavar="IP", help="only this peer's entries")
    cache_flush.add_argument("--control", default=DEFAULT_PATH)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from .core.errors import ConfigError
    from .shell.daemon import run_daemon
    from .shell.rules import RulesError
    from .shell.settings import cli_values, load_file, options_from, resolve_system

    log = logging.getLogger("nfq_tcpcrypt")
    try:
        file_values = load_file(args.config) if args.config else {}
        options = options_from(file_values, cli_values(args))
        resolve_system(options)
        options.config_file, options.cli = args.config, cli_values(args)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    if options.log_level and not args.sub_log_level:
        logging.getLogger().setLevel(getattr(logging, options.log_level.upper(), logging.INFO))
    try:
        return run_daemon(options)
    except (ConfigError, RulesError, OSError) as exc:
        log.error("cannot run: %s", exc)
        return 1


def _cmd_sessions(args: argparse.Namespace) -> int:
    table = _query(args, "sessions")
    if table is _UNREACHABLE:
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
        "rekeys",
        "bytes_in",
        "bytes_out",
        "session_id",
    ]
    _print_table(columns, table)
    if not table:
        print("(no sessions)")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    params = {"peer": args.peer} if getattr(args, "peer", None) else {}
    cmd = "cache" if args.action == "show" else "cache_flush"
    reply = _query(args, cmd, params=params)
    if reply is _UNREACHABLE:
        return 2
    if isinstance(reply, dict) and "error" in reply:
        print(f"nfq-tcpcrypt: {reply['error']}", file=sys.stderr)
        return 1
    if args.action == "flush":
        print(f"flushed {reply.get('flushed', 0)} cached session(s)")
        return 0
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    columns = ["peer", "tep", "aead", "original_role", "next_index", "resumptions", "expires_in"]
    _print_table(columns, reply)
    if not reply:
        print("(resumption cache empty)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    doc = _query(args, "status")
    if doc is _UNREACHABLE:
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    handshakes = doc["handshakes"]
    print(f"nfq-tcpcrypt {doc['version']} ({doc.get('build', 'pure')}): {doc['mode']} mode, pid {doc['pid']}, "
          f"{doc['workers']} worker(s), "
          f"queues {doc['queues'][0]}..{doc['queues'][-1]} ({doc.get('queue_backend', 'netfilterqueue')}"
          f"{', GSO' if doc.get('queue_gso') else ''})")  # fmt: skip
    print(f"rules in place: {len(doc['rules'])}")
    for line in doc["rules"]:
        print(f"  {line}")
    print(f"sessions in the table: {doc['sessions']}; resumption cache entries: {doc['cache_entries']}")
    print(f"handshakes: {handshakes['fresh']} fresh, {handshakes['resumed']} resumed")
    for title, table in (("fallbacks to plain TCP", doc["fallbacks"]), ("aborts", doc["aborts"])):
        print(f"{title}: {sum(table.values())}")
        for reason, count in sorted(table.items(), key=lambda item: -item[1]):
            print(f"  {count:8d}  {reason}")
    print(f"tag failures: {doc['tag_failures']}; kernel queue drops: {doc['kernel_queue_drops']}")
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    reply = _query(args, "metrics")
    if reply is _UNREACHABLE:
        return 2
    sys.stdout.write(reply["text"])
    return 0


_UNREACHABLE = object()


def _query(args: argparse.Namespace, cmd: str, params: dict[str, str] | None = None) -> Any:
    """The daemon's answer to `cmd` on its control socket, or _UNREACHABLE (said on stderr)."""
    from .shell.control import query

    try:
        return query(args.control, cmd, params=params)
    except OSError as exc:
        print(f"nfq-tcpcrypt: cannot reach the daemon at {args.control}: {exc}", file=sys.stderr)
        return _UNREACHABLE


def _print_table(columns: list[str], table: list[dict[str, object]]) -> None:
    rows = [[str(entry.get(col, "")) for col in columns] for entry in table]
    widths = [max([len(col), *(len(row[i]) for row in rows)]) for i, col in enumerate(columns)]
    print("  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _cmd_rules(args: argparse.Namespace) -> int:
    from .core.errors import ConfigError
    from .shell import rules, settings
    from .shell.control import query

    try:
        file_values = settings.load_file(args.config) if args.config else {}
    except ConfigError as exc:
        print(f"nfq-tcpcrypt: {exc}", file=sys.stderr)
        return 2
    args.queue_num = args.queue_num or file_values.get("queue_num", settings.DEFAULT_QUEUE_NUM)
    args.control = args.control or file_values.get("control", DEFAULT_PATH)

    if args.action == "show":
        for family in ("ipv4", "ipv6"):
            if rules.available(family):
                for line in rules.leftovers(family):
                    print(f"{family}: {line}")
                for chain in rules.nft_chains(family):
                    print(f"{family}: nft base chain {rules.NFT_FAMILY[family]} mangle {chain}")
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
    from .lab.demo import run_lab

    return run_lab(size=args.size, keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nfq-tcpcrypt` console script."""
    args = build_parser().parse_args(argv)
    level = getattr(args, "sub_log_level", None) or args.log_level
    _setup_logging(level)
    handlers = {
        "run": _cmd_run,
        "sessions": _cmd_sessions,
        "cache": _cmd_cache,
        "rules": _cmd_rules,
        "status": _cmd_status,
        "metrics": _cmd_metrics,
        "decode": decode_tool.run,
        "lab": _cmd_lab,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
