"""The ``objfs`` command: mount, status, keys generate, rekey, --version.

User mistakes (bad configuration, busy cache directory, unusable bucket) print one line on
stderr and exit with status 2 (configuration) or 1 (anything else), without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import trio

from objfs import __version__, errors, status
from objfs.codec import write_key_file
from objfs.config import Settings, load_settings
from objfs.fstier import FileSystemTier
from objfs.journal import Journal
from objfs.rekey import rekey

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="objfs", description="Orthanc storage in object "
                                     "storage, through a FUSE mount.")
    parser.add_argument("--version", action="version", version=f"objfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", action="append", default=[], metavar="PATH",
                       help="a JSON file, or a directory whose *.json files are merged; "
                            "repeatable, later wins")

    mount = sub.add_parser("mount", help="mount and serve in the foreground")
    with_config(mount)
    mount.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    mount.add_argument("mountpoint", type=Path)
    status = sub.add_parser("status", help="pending uploads and cache use, from the journal")
    with_config(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    keys = sub.add_parser("keys", help="master key files")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="write a new random master key (mode 0600)")
    generate.add_argument("path", type=Path)
    rekey = sub.add_parser("rekey", help="re-encrypt the bucket under the current MasterKey")
    with_config(rekey)
    rekey.add_argument("--dry-run", action="store_true", help="count, change nothing")
    rekey.add_argument("--include-unencrypted", action="store_true",
                       help="also encrypt objects that are not encrypted")
    return parser


def _status(settings: Settings, as_json: bool) -> int:
    path = settings.cache_directory / "journal.sqlite"
    if not path.exists():
        print(f"objfs: no journal at {path} (never mounted with this CacheDirectory)",
              file=sys.stderr)
        return 1
    journal = Journal(path, readonly=True)
    try:
        stats = journal.stats()
    finally:
        journal.close()
    fs = None
    if settings.fs_directory is not None:
        fs = FileSystemTier(settings.fs_directory, None, False)
    found = status.facts(stats, settings, fs)
    print(json.dumps(found, indent=2) if as_json else status.render(settings, found))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keys":
            write_key_file(args.path)
            print(f"objfs: wrote a new master key to {args.path} (mode 0600); keep a copy: "
                  "without it, what it encrypts cannot be read")
            return 0
        settings = load_settings(args.config)
        if args.command == "status":
            return _status(settings, args.json)
        logging.basicConfig(level=getattr(args, "log_level", "INFO"), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # The Azure SDK logs every HTTP request at INFO.
        logging.getLogger("azure").setLevel(logging.WARNING)
        if args.command == "rekey":
            summary = trio.run(rekey, settings, args.dry_run, args.include_unencrypted)
            print(f"objfs rekey{' (dry run)' if args.dry_run else ''}: "
                  f"{summary.line(args.dry_run)}")
            return 1 if summary.failed else 0
        from objfs.daemon import serve  # pyfuse3 is needed only to mount

        trio.run(serve, settings, args.mountpoint)
        return 0
    except errors.ConfigError as exc:
        print(f"objfs: configuration error: {exc}", file=sys.stderr)
        return 2
    except (errors.ObjfsError, OSError) as exc:
        print(f"objfs: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
