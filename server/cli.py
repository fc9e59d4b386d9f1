"""`fieldsync serve | token | compact | inspect`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import math
import os
import resource
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from aiohttp import web
from pycrdt import Map

from crdt_models import record as records
from crdt_models.context import Geofence, RuleSettings
from storage import RecordKey, StorageError, open_store

from . import gctune
from .auth import is_valid_id, mint_token, resolve_public_key, resolve_secret
from .compaction import compact_due
from .config import Config, SocketSettings
from .handshake import HandshakeSettings
from .ratelimit import Rate, RateSettings
from .records_api import iso, record_json
from .serving import serving_loop

DEFAULT_DB = "fieldsync.db"


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("FIELDSYNC_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldsync", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the sync server")
    _serve_options(serve)
    serve.set_defaults(run=_serve)

    token = sub.add_parser("token", help="print a signed JWT for a user")
    _db_arg(token)
    token.add_argument("--tenant", required=True)
    token.add_argument("--bus", required=True, help="comma-separated bu ids, or '*'")
    token.add_argument("--user", required=True)
    token.add_argument("--roles", default="", help="comma-separated roles")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.set_defaults(run=_token)

    compact = sub.add_parser("compact", help="fold record logs into snapshots")
    _db_arg(compact)
    compact.add_argument("--min-tail", type=int, default=2)
    compact.set_defaults(run=_compact)

    inspect = sub.add_parser("inspect", help="print a record, its version and its decisions")
    _db_arg(inspect)
    inspect.add_argument("domain")
    inspect.add_argument("record_id")
    inspect.add_argument("--tenant", required=True)
    inspect.set_defaults(run=_inspect)
    return parser


RATE_DEFAULTS = {
    "device": "60/minute",
    "user": "120/minute",
    "tenant": "6000/minute",
    "record": "600/minute",
}


RATE_HELP = {
    "device": "sync requests per device",
    "user": "sync requests per user",
    "tenant": "sync requests per tenant",
    "record": "accepted updates per record",
}


def _serve_options(serve: argparse.ArgumentParser) -> None:
    _db_arg(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--node-id",
        type=node_id,
        default=os.environ.get("FIELDSYNC_NODE_ID"),
        help="this node's id in the change log (several nodes on one database: one each)",
    )
    serve.add_argument(
        "--node-file",
        default=os.environ.get("FIELDSYNC_NODE_FILE", "fieldsync-node.id"),
        help="on PostgreSQL without --node-id: where the id registered at first start is kept",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=_split(os.environ.get("FIELDSYNC_ALLOWED_ORIGINS", "")),
        help="a browser Origin allowed to open sockets (repeatable; default: same host only)",
    )
    for scope, default in RATE_DEFAULTS.items():
        _env_option(
            serve,
            f"--rate-{scope}",
            f"FIELDSYNC_RATE_{scope.upper()}",
            Rate.parse,
            default,
            f"{RATE_HELP[scope]}: N/second|minute|hour (default {default})",
        )
    _env_option(
        serve,
        "--max-accuracy",
        "FIELDSYNC_MAX_ACCURACY_M",
        float,
        "100",
        "largest GPS accuracy (metres) an attendance punch may report",
    )
    _env_option(
        serve,
        "--clock-skew",
        "FIELDSYNC_CLOCK_SKEW_S",
        float,
        "300",
        "seconds a device's punch time may run ahead of the server's clock",
    )
    _env_option(
        serve,
        "--geofences",
        "FIELDSYNC_GEOFENCES",
        load_geofences,
        "",
        'JSON file {"<bu>": {"lat": .., "lon": .., "radius_m": ..}}: attendance'
        " punches outside their bu's circle are refused",
    )
    _env_option(
        serve,
        "--memory-limit",
        "FIELDSYNC_MEMORY_LIMIT",
        parse_size,
        "4GiB",
        "address-space ceiling of the process, e.g. 2GiB (0: none); an allocation"
        " past it fails at once instead of taking the machine",
    )
    _env_option(
        serve,
        "--head-timeout",
        "FIELDSYNC_HEAD_TIMEOUT",
        float,
        "10",
        "seconds a new connection has to send its first complete request head (0: no limit);"
        " slower ones are answered 408 and closed",
    )
    _env_option(
        serve,
        "--max-pending-connections",
        "FIELDSYNC_MAX_PENDING_CONNECTIONS",
        int,
        "1000",
        "connections that may wait for their first complete request head at once (0: no"
        " cap); past it the oldest waiting one is closed",
    )
    _env_option(
        serve,
        "--gc-tune",
        "FIELDSYNC_GC_TUNE",
        parse_switch,
        "on",
        "on: freeze long-lived objects so full garbage collections stay short"
        " (see server/gctune.py); off: Python's defaults",
    )
    _env_option(
        serve,
        "--quick-refusals",
        "FIELDSYNC_QUICK_REFUSALS",
        parse_switch,
        "on",
        "on: a client already over its rate limit is answered its 429 in front of aiohttp,"
        " at about half the CPU (see server/quick_refusals.py); off: by the handler",
    )
    _env_option(
        serve,
        "--sockets-per-device",
        "FIELDSYNC_SOCKETS_PER_DEVICE",
        int,
        "4",
        "open device sockets per device",
    )
    _env_option(
        serve,
        "--sockets-per-user",
        "FIELDSYNC_SOCKETS_PER_USER",
        positive_int,
        "64",
        "open sockets (device and Yjs) per user",
    )
    _env_option(
        serve,
        "--tenant-merges",
        "FIELDSYNC_TENANT_MERGES",
        positive_int,
        str(RateSettings().tenant_in_flight),
        "sync requests of one tenant merged at once while it is alone on the node (one while"
        " another tenant is active; the rest queue behind them)",
    )
    _env_option(
        serve,
        "--rate-hold",
        "FIELDSYNC_RATE_HOLD_S",
        non_negative_float,
        str(RateSettings().early_retry_hold_s),
        "longest a 429 is held when the client asked again before its Retry-After was up"
        " (0: never held)",
    )


def _env_option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    convert: Callable[[str], object],
    default: str,
    help_text: str,
) -> None:
    """A flag whose default comes from an environment variable, else `default`.

    The default stays a string: argparse converts it like a typed value, so a bad
    environment variable gets the same one-line error as a bad flag.
    """

    def typed(value: str) -> object:
        try:
            return convert(value)
        except ValueError as exc:  # argparse would show only the converter's name
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        flag, type=typed, default=os.environ.get(env, default), help=f"{help_text} (env {env})"
    )


def _db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=db_spec,
        default=os.environ.get("FIELDSYNC_DB", DEFAULT_DB),
        help="SQLite file path (default ./fieldsync.db; sqlite:///PATH also works) or"
        " postgresql:// URL",
    )


def db_spec(value: str) -> str:
    """A PostgreSQL URL as it is; a SQLite file as its path (``sqlite:///PATH`` as the
    SQLAlchemy form means: ``sqlite:////abs/file.db`` is ``/abs/file.db``)."""
    if value.startswith(("postgres://", "postgresql://")):
        return value
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value[len("sqlite:///") :]
    if "://" in value:
        raise argparse.ArgumentTypeError(
            f"--db is a SQLite file path, sqlite:///PATH or a postgresql:// URL, not {value!r}"
        )
    return value


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def load_geofences(path: str) -> dict[str, Geofence]:
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        return {
            str(bu): Geofence(float(g["lat"]), float(g["lon"]), float(g["radius_m"]))
            for bu, g in raw.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read geofences from {path}: {exc}") from None


def parse_size(value: str) -> int:
    """Bytes from '0', '512MiB', '4GiB' or a plain number of bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "": 1}
    text = value.strip().lower()
    number = text.rstrip("kmgib")
    unit = text[len(number) :]
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"a size is like 512MiB or 4GiB, not {value!r}")
    return int(number) * units[unit]


def positive_int(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {value!r}")
    return int(value)


def non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (0 <= number < math.inf):
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, not {value!r}")
    return number


def node_id(value: str) -> str:
    if not is_valid_id(value):
        raise argparse.ArgumentTypeError(
            f"a node id is 1-128 letters, digits and _.:@- (starting with a letter or digit),"
            f" not {value!r}"
        )
    return value


def parse_switch(value: str) -> bool:
    text = value.strip().lower()
    if text in ("on", "1", "true", "yes"):
        return True
    if text in ("off", "0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")


def _limit_memory(limit: int) -> None:
    if limit <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _serve(args: argparse.Namespace) -> None:
    _limit_memory(args.memory_limit)
    public = resolve_public_key()
    secret, source = ("", "") if public else resolve_secret(args.db)
    if public:
        source = f"public key {public[2]} ({', '.join(public[1])})"
    sockets = SocketSettings(allowed_origins=frozenset(args.allow_origin))
    rates = RateSettings(
        args.rate_device,
        args.rate_user,
        args.rate_tenant,
        args.sockets_per_device,
        args.rate_record,
        sockets_per_user=args.sockets_per_user,
        tenant_in_flight=args.tenant_merges,
        early_retry_hold_s=args.rate_hold,
    )
    rules = RuleSettings(
        clock_skew=timedelta(seconds=args.clock_skew),
        max_accuracy_m=args.max_accuracy,
        geofences=args.geofences,
    )
    config = Config(
        rules=rules,
        db=args.db,
        jwt_secret=secret,
        jwt_public_key=public[0] if public else None,
        jwt_algorithms=public[1] if public else ("HS256",),
        node_id=args.node_id,
        node_file=args.node_file,
        sockets=sockets,
        rates=rates,
    )
    from .app import create_app

    app = create_app(config)

    async def banner(_: web.Application) -> None:
        print(_welcome(args, source), flush=True)

    app.on_startup.append(banner)
    if args.gc_tune:
        gctune.tune(app)
    guard = HandshakeSettings(args.head_timeout, args.max_pending_connections)
    loop = serving_loop(app, guard, args.quick_refusals)
    try:
        web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, loop=loop)
    except StorageError as exc:  # the database refused or is unreachable at start
        raise SystemExit(f"fieldsync: {exc}") from None


def _welcome(args: argparse.Namespace, secret_source: str) -> str:
    """How to get a token and sync a first record, ready to paste."""
    record_id = str(uuid.uuid4())
    doc = records.new_doc()
    doc.get(records.FIELDS_ROOT, type=Map).update(
        {"jobdesc": "Check fire extinguishers", "priority": "HIGH"}
    )
    update = base64.b64encode(doc.get_update()).decode()
    db = f" --db {args.db}" if args.db != DEFAULT_DB else ""
    base = f"http://{args.host}:{args.port}"
    body = json.dumps({"items": [{"record_id": record_id, "bu": "bu1", "update": update}]})
    return f"""
fieldsync is serving on {base} (database: {args.db}; JWT secret from {secret_source})

Get a token:
  TOKEN=$({_me()} token{db} --tenant acme --bus bu1 --user alice)

Sync a first record (a Yjs update setting two fields of a task):
  curl -s -X POST {base}/api/v1/sync/activity/sync \\
    -H "Authorization: Bearer $TOKEN" -H "Device-Id: phone-1" -H "Content-Type: application/json" \\
    -d '{body}'

Pull what changed:
  curl -s {base}/api/v1/sync/activity/changes \\
    -H "Authorization: Bearer $TOKEN" -H "Device-Id: phone-1"

Read it back as JSON:
  curl -s {base}/api/v1/records/activity/{record_id} -H "Authorization: Bearer $TOKEN"
"""


def _me() -> str:
    """How the user started us (`.venv/bin/fieldsync` works without activating the venv)."""
    started = sys.argv[0]
    return started if Path(started).name == "fieldsync" else "fieldsync"


def _token(args: argparse.Namespace) -> None:
    secret, _ = resolve_secret(args.db)
    bus = _split(args.bus)
    if not bus:
        sys.exit("--bus needs at least one bu id, or '*'")
    print(
        mint_token(
            secret,
            tenant=args.tenant,
            user=args.user,
            bus=bus,
            roles=_split(args.roles),
            ttl_s=args.ttl,
        )
    )


def _compact(args: argparse.Namespace) -> None:
    async def run() -> int:
        store = open_store(args.db)
        await store.open()
        try:
            return await compact_due(store, max(1, args.min_tail))
        finally:
            await store.close()

    print(f"compacted {asyncio.run(run())} records")


def _inspect(args: argparse.Namespace) -> None:
    async def run() -> int:
        store = open_store(args.db)
        await store.open()
        try:
            key = RecordKey(args.tenant, args.domain, args.record_id)
            row = await store.get_record(key)
            if row is None:
                print(f"no record {args.domain}/{args.record_id} in tenant {args.tenant}")
                return 1
            print(json.dumps(record_json(row), indent=2, ensure_ascii=False))
            print("\nhistory (newest last):")
            for entry in await store.record_log(key):
                decisions = json.loads(entry.decisions)
                print(
                    f"  v{entry.version} {iso(entry.received_at)} {entry.origin}"
                    f" by {entry.actor} ({entry.device or '-'}), {len(entry.update)} bytes"
                )
                for d in decisions:
                    print(
                        f"    decision {d['rule']} on {d['field']}: kept {d['kept']!r},"
                        f" refused {d['rejected']!r} - {d['reason']}"
                    )
            return 0
        finally:
            await store.close()

    sys.exit(asyncio.run(run()))
