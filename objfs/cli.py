"""The ``objfs`` command: mount, status, config show/check/options, health, keys generate,
rekey, audit, --version.

User mistakes (bad configuration, busy cache directory, unusable bucket) print one line on
stderr and exit with status 2 (configuration) or 1 (anything else), without a traceback.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import logging
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from objfs import __version__, errors, logs, status
from objfs.audit import DEFAULT_GRACE, audit, describe
from objfs.backends import check_client
from objfs.codec import write_key_file
from objfs.config import DEFAULT_CONFIG_DIR, Settings, check, load_settings, masked, text_help
from objfs.config.schema import markdown_tables
from objfs.errnos import is_disk_full
from objfs.fstier import FileSystemTier
from objfs.journal import read_stats
from objfs.rekey import Summary, rekey

log = logging.getLogger(__name__)

DRAIN_REFRESH = 1.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="objfs", description="Orthanc storage in object "
                                     "storage, through a FUSE mount.")
    parser.add_argument("--version", action="version", version=f"objfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", action="append", default=[], metavar="PATH",
                       help="a JSON file, or a directory whose *.json files are merged; "
                            f"repeatable, later wins (default: {DEFAULT_CONFIG_DIR})")

    def with_log_level(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    mount = sub.add_parser("mount", help="mount and serve in the foreground")
    with_config(mount)
    with_log_level(mount)
    mount.add_argument("mountpoint", type=Path)
    status = sub.add_parser("status", help="pending uploads and cache use, from the journal; "
                            "follows the progress while the daemon drains at shutdown")
    with_config(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    config = sub.add_parser("config", help="the merged configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print objfs' sections, secrets masked")
    with_config(show)
    check = config_sub.add_parser("check", help="validate; list every problem, exit 2 if any")
    with_config(check)
    options = config_sub.add_parser("options", help="every option with its type, default and "
                                    "meaning")
    options.add_argument("--markdown", action="store_true",
                         help="the README's option tables, as Markdown")
    health = sub.add_parser("health", help="ask the running daemon's GET /health (exit 0 when "
                            "healthy, 1 otherwise): for container health checks")
    with_config(health)
    health.add_argument("--timeout", type=float, default=15.0, help="seconds (default 15)")
    keys = sub.add_parser("keys", help="master key files")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="write a new random master key (mode 0600)")
    generate.add_argument("path", type=Path)
    rekey = sub.add_parser("rekey", help="re-encrypt the bucket under the current MasterKey")
    with_config(rekey)
    with_log_level(rekey)
    rekey.add_argument("--dry-run", action="store_true", help="count, change nothing")
    rekey.add_argument("--include-unencrypted", action="store_true",
                       help="also encrypt objects that are not encrypted")
    audit = sub.add_parser("audit", help="compare the bucket with Orthanc's attachments: "
                           "missing data (exit 1) and orphan objects")
    with_config(audit)
    with_log_level(audit)
    audit.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    audit.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                       help="unreferenced objects younger than this are in flight, not "
                            f"orphans (default {DEFAULT_GRACE:.0f})")
    audit.add_argument("--delete-orphans", action="store_true",
                       help="delete the orphan objects found")
    return parser


def _audit(settings: Settings, as_json: bool, grace: float, delete_orphans: bool) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = trio.run(functools.partial(audit, settings, grace=grace,
                                        delete_orphans=delete_orphans, progress=progress))
    print(json.dumps(report.to_json(), indent=2) if as_json else describe(report))
    return 1 if report.missing else 0


def _status(settings: Settings, as_json: bool) -> int:
    path = settings.cache_directory / "journal.sqlite"
    if not path.exists():
        print(f"objfs: no journal at {path} (never mounted with this CacheDirectory)",
              file=sys.stderr)
        return 1
    state = status.daemon_phase(settings.cache_directory)
    found = _facts(settings, path, state)
    found.update(status.cluster_facts(
        settings, list(state.get("locks_held") or []) if state else None,
        state.get("bucket_lookups") if state else None))
    failing_since = state.get("bucket_failing_since") if state else None
    if as_json:
        found["daemon"] = state["phase"] if state else "stopped"
        found["bucket_failing_seconds"] = (None if failing_since is None
                                           else round(time.time() - failing_since, 1))
        found["bucket_error"] = state.get("bucket_error") if state else None
        print(json.dumps(found, indent=2))
        return 0
    print(status.render(settings, found))
    print(f"daemon:           {state['phase'] if state else 'not running'}")
    if state is not None and failing_since is not None:
        print(f"bucket:           NOT ANSWERING for {time.time() - failing_since:.0f}s "
              f"({state.get('bucket_error')}); writes are kept locally")
    while state is not None and state["phase"] == "draining":
        print(status.drain_line(state, found), flush=True)
        time.sleep(DRAIN_REFRESH)
        state = status.daemon_phase(settings.cache_directory)
        found = _facts(settings, path, state)
    if state is None and found["pending_uploads"]:
        print(f"{found['pending_uploads']} uploads stay journaled; they resume at the next start")
    return 0


def _facts(settings: Settings, path: Path, state: dict[str, Any] | None) -> dict[str, Any]:
    """`status.facts`, with the cache budget the running daemon (`state`) fitted to the disk."""
    stats = read_stats(path)
    fs = None
    if settings.fs_directory is not None:
        fs = FileSystemTier(settings.fs_directory, None, False)
    return status.facts(stats, settings, fs, state.get("cache_capacity") if state else None)


def _config(command: str, paths: list[str]) -> int:
    tree, settings, problems = check(paths)
    if settings is not None and command == "check":
        problems = check_client(settings)
        if problems:
            settings = None
    if command == "show":
        print(json.dumps(masked(tree), indent=2))
    if settings is None:
        print(f"objfs: {len(problems)} configuration problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if command == "check":
        print(f"objfs: configuration OK: {settings.provider} bucket, "
              f"{settings.layout.structure} layout, HybridMode {settings.hybrid_mode}, "
              f"cache {settings.cache_directory}")
    return 0


def _health(settings: Settings, timeout: float) -> int:
    rest = settings.rest_api
    if rest is None:
        print("objfs: Objfs.RestApi is disabled: no /health to ask", file=sys.stderr)
        return 1
    host = "127.0.0.1" if rest.host in ("0.0.0.0", "") else "::1" if rest.host == "::" \
        else rest.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{rest.port}/health"
    request = urllib.request.Request(url)
    if rest.username is not None:
        token = base64.b64encode(f"{rest.username}:{rest.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"))
        return 1
    except OSError as exc:
        print(f"objfs: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1


def _rekey_progress() -> Callable[[Summary], None]:
    """A progress line on stderr: rewritten in place on a terminal, every 5 s in a log."""
    last = [0.0]
    tty = sys.stderr.isatty()

    def show(summary: Summary) -> None:
        now = time.monotonic()
        if now - last[0] < (0.2 if tty else 5.0):
            return
        last[0] = now
        end = "\r" if tty else "\n"
        print(f"rekey: scanned {summary.scanned}, rewritten {summary.rewritten}, failed "
              f"{summary.failed}", end=end, file=sys.stderr, flush=True)

    return show


def _config_paths(given: list[str]) -> list[str]:
    if given:
        return given
    return [DEFAULT_CONFIG_DIR] if Path(DEFAULT_CONFIG_DIR).is_dir() else []


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keys":
            write_key_file(args.path)
            print(f"objfs: wrote a new master key to {args.path} (mode 0600); keep a copy: "
                  "without it, what it encrypts cannot be read")
            return 0
        if args.command == "config" and args.config_command == "options":
            print(markdown_tables() if args.markdown else text_help())
            return 0
        paths = _config_paths(args.config)
        if args.command == "config":
            return _config(args.config_command, paths)
        settings = load_settings(paths)
        if args.command == "status":
            return _status(settings, args.json)
        if args.command == "health":
            return _health(settings, args.timeout)
        logs.setup(getattr(args, "log_level", "INFO"))
        if args.command == "audit":
            return _audit(settings, args.json, args.grace, args.delete_orphans)
        if args.command == "rekey":
            summary = trio.run(rekey, settings, args.dry_run, args.include_unencrypted,
                               _rekey_progress())
            print(f"objfs rekey{' (dry run)' if args.dry_run else ''}: "
                  f"{summary.line(args.dry_run)}")
            return 1 if summary.failed else 0
        from objfs.daemon import serve  # pyfuse3 is needed only to mount

        trio.run(serve, settings, args.mountpoint)
        return 0
    except errors.ConfigError as exc:
        for problem in exc.problems:
            print(f"objfs: configuration error: {problem}", file=sys.stderr)
        return 2
    except (errors.ObjfsError, OSError) as exc:
        print(f"objfs: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        if not is_disk_full(exc):
            raise
        print(f"objfs: the disk of the cache directory is full ({exc}); free space there and "
              "start objfs again", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
