"""The `meshlib` command: check policy like `istioctl analyze`, explain routing decisions.

meshlib check mesh.yaml policies/
meshlib routes mesh.yaml --host reviews --header end-user=jason --output json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from meshlib._version import __version__
from meshlib.config import MeshConfig, is_header_name
from meshlib.errors import ConfigError
from meshlib.policy.analysis import analyze
from meshlib.policy.loader import load_paths
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import RouteDecision, Snapshot


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"meshlib: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `meshlib check ... | head`: the verdict still counts
        # Python flushes stdout at exit: into /dev/null, not the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        summary = getattr(args, "summary", None)
        if summary:
            print(summary, file=sys.stderr)
        return int(getattr(args, "verdict", 1))
    except OSError as exc:  # a path the system refuses (too long, unreadable, ...)
        print(f"meshlib: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlib", description="Istio policy for Python services, inside the process."
    )
    parser.add_argument("--version", action="version", version=f"meshlib {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate policy files and how they fit together (like istioctl analyze)",
        description="Report every error and warning, one per line. Exit 1 if there is an error.",
    )
    check.add_argument("paths", nargs="+", metavar="PATH", help="policy file or folder")
    check.add_argument(
        "--namespace", default="default", help="namespace of resources that set none"
    )
    _add_cluster_domain(check)
    check.set_defaults(run=_check)

    routes = commands.add_parser(
        "routes",
        help="show which VirtualService route a request matches and the policy that applies",
    )
    routes.add_argument("paths", nargs="+", metavar="PATH", help="policy file or folder")
    routes.add_argument("--host", required=True, help="request host, e.g. reviews or reviews:9080")
    routes.add_argument(
        "--path", default="/", help="request path, starting with /; may include ?query (default /)"
    )
    routes.add_argument("--method", default="GET", help="request method (default GET)")
    routes.add_argument("--scheme", default="http", choices=("http", "https"))
    routes.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="request header (repeatable)"
    )
    routes.add_argument(
        "--source-labels", default="", metavar="k=v,...", help="labels of the calling workload"
    )
    routes.add_argument(
        "--namespace",
        default="default",
        help="namespace of the calling workload, and of resources that set none",
    )
    _add_cluster_domain(routes)
    routes.add_argument("--output", "-o", choices=("text", "json"), default="text")
    routes.set_defaults(run=_routes)
    return parser


def _add_cluster_domain(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--cluster-domain",
        help="DNS suffix of short host names (default $MESHLIB_CLUSTER_DOMAIN, else cluster.local)",
    )


def _cluster_domain(args: argparse.Namespace) -> str:
    """--cluster-domain, else MESHLIB_CLUSTER_DOMAIN, else cluster.local, as a Mesh reads it."""
    if args.cluster_domain is not None:
        domain = args.cluster_domain
        return _config("--cluster-domain", domain, cluster_domain=domain).cluster_domain
    variable = "MESHLIB_CLUSTER_DOMAIN"  # a bad value is reported by its name
    return MeshConfig.from_env({variable: os.environ.get(variable, "")}).cluster_domain


def _check(args: argparse.Namespace) -> int:
    _config("--namespace", args.namespace, namespace=args.namespace)  # checked as in `routes`
    domain = _cluster_domain(args)
    variable = "MESHLIB_ROOT_NAMESPACE"  # whose Telemetry is the mesh's, as a Mesh reads it
    root = MeshConfig.from_env({variable: os.environ.get(variable, "")}).root_namespace
    # Both pause the garbage collector themselves (many live objects, no garbage).
    result = load_paths(args.paths, default_namespace=args.namespace, keep_lines=True)
    found = analyze(
        result.resources, cluster_domain=domain, root_namespace=root, lines=result.lines
    )
    findings = [*result.diagnostics, *found]
    findings.sort(key=lambda d: (d.file or "", d.line or 0))
    errors = sum(d.severity == "error" for d in findings)
    warnings = len(findings) - errors
    # What the exit code and the summary say, even if the output is cut short (| head).
    args.verdict = 1 if errors else 0
    # Every resource read, valid or not, as a user counts those in their files.
    read = result.resources_read
    args.summary = (
        f"{read} {'resource' if read == 1 else 'resources'} checked:"
        f" {errors} error(s), {warnings} warning(s)"
    )
    for diagnostic in findings:
        print(diagnostic)
    print(args.summary, file=sys.stderr)
    return int(args.verdict)


def _config(flag: str, given: str, **values: Any) -> MeshConfig:
    """A MeshConfig of `values`; a refused value is reported by its flag, as `given`."""
    try:
        return MeshConfig.create(**values)
    except ConfigError as exc:
        name, value = list(values.items())[-1]
        message = str(exc).removeprefix(f"{name}={value!r}: ")
        raise ConfigError(f"{flag} {given!r}: {message}") from None


def _routes(args: argparse.Namespace) -> int:
    labels = {}
    for item in filter(None, args.source_labels.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--source-labels: expected k=v pairs, got {item!r}")
        labels[key.strip()] = value.strip()
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--header: expected K=V, got {item!r}")
        name = key.strip()
        if not is_header_name(name):
            raise ConfigError(
                f"--header {item!r}: {name!r} is not an HTTP header name"
                " (letters, digits and !#$%&'*+-.^_`|~)"
            )
        headers[name.lower()] = value
    _config("--namespace", args.namespace, namespace=args.namespace)
    domain = _cluster_domain(args)
    config = _config(
        "--source-labels",
        args.source_labels,
        namespace=args.namespace,
        cluster_domain=domain,
        labels=labels,
    )
    if not _is_authority(args.host):
        raise ConfigError(
            f"--host: {args.host!r} is not a host or host:port, e.g. reviews or reviews:9080"
        )
    path, _, query = args.path.partition("?")
    if not path.startswith("/"):
        raise ConfigError(f"--path {args.path!r}: {_path_hint(args.path)}")
    result = load_paths(args.paths, default_namespace=args.namespace)
    if result.errors:
        for diagnostic in result.errors:
            print(diagnostic, file=sys.stderr)
        return 1
    snapshot = Snapshot.build(result.resources, config)
    request = RequestAttributes(
        args.method.upper(),
        args.host,
        path,
        scheme=args.scheme,
        query=query,
        headers=headers,
    )
    explained = explain(snapshot, snapshot.route(request), request.port)
    if args.output == "json":
        print(json.dumps(explained, indent=2))
    else:
        print(_as_text(explained))
    return 0


def _path_hint(given: str) -> str:
    """Why a --path is refused, and what to write: HTTP paths, and so Istio's `uri`
    matches, start with `/` (`prefix: /reviews` never matches `reviews/1`)."""
    parts = urlsplit(given)
    if parts.scheme and parts.netloc:  # a URL: its parts go to their own flags
        path = parts.path or "/"
        query = f"?{parts.query}" if parts.query else ""
        return f"a path, not a URL: write --host {parts.netloc} --path {path}{query}"
    return f"must start with / (an HTTP path): write --path /{given}"


def _is_authority(text: str) -> bool:
    """A host, with a port or not (`reviews`, `reviews:9080`, `[::1]:80`); not a URL."""
    if not text or any(c in text for c in "/@?# "):
        return False
    try:
        parts = urlsplit("//" + text)
        parts.port  # noqa: B018 - raises ValueError for a port that is no port
    except ValueError:
        return False
    return bool(parts.hostname) and not text.endswith(":")


def explain(
    snapshot: Snapshot, decision: RouteDecision, request_port: int | None = None
) -> dict[str, Any]:
    """A routing decision as the `meshlib routes --output json` contract describes it.

    `request_port` is the port the client would connect to when the authority names none
    (the URL's, else 80 or 443), as the data plane falls back to it."""
    route = decision.route
    out: dict[str, Any] = {
        "host": decision.host,
        "virtualService": decision.virtual_service,
        "route": None,
        "destinations": [],
        "timeout": None,
        "retries": None,
        "fault": None,
        "mirror": None,
        "headers": None,
    }
    if decision.passthrough:
        out["passthrough"] = True
    if route is None:
        return out
    if route.virtual_service:
        out["route"] = {"index": route.index, "name": route.name}
    total = route.total_weight or 1
    notes: list[str] = []
    for dest in route.destinations:
        named = dest.port is not None
        port = dest.port if named else decision.port
        if port is None:
            port = request_port
        asked = port  # what the client connects to
        service = snapshot.service(dest.host)
        service_port = service.serving_port(port, named=named) if service else None
        if service_port is not None:
            port = service_port.number
        entry: dict[str, Any] = {
            "host": dest.host,
            "subset": dest.subset,
            "port": port,
            "weight": round(dest.weight * 100 / total, 4),
            "endpoints": [str(e) for e in snapshot.endpoints(dest.host, dest.subset, port)],
            "trafficPolicy": None,
        }
        if dest.subset is not None and not snapshot.has_subset(dest.host, dest.subset):
            entry["error"] = "subset not defined by any DestinationRule (503, no cluster)"
        elif service is not None and service_port is None:
            entry["error"] = f"port {port} is not a port of this service (503, no cluster)"
        elif service_port is not None:
            # What the data plane's cluster for (host, subset, port) takes: DestinationRules
            # merged, subset over host, port-level entries over both.
            policy = snapshot.traffic_policy(dest.host, dest.subset, port)
            entry["trafficPolicy"] = policy.to_dict() or None
            if asked is not None and asked != port:  # a one-port service answers any port
                implied = " (the scheme's: --host names none)" if decision.port is None else ""
                note = (
                    f"port {asked}{implied} is not declared by {dest.host}: its only port,"
                    f" {port}, is used (a sidecar has no route for port {asked})"
                )
                if note not in notes:
                    notes.append(note)
        out["destinations"].append(entry)
    out.update(route.to_dict())
    if notes:
        out["notes"] = notes
    return out


# DestinationRule blocks `routes` shows as configured that the data plane does not apply yet.
_NOT_ENFORCED = frozenset({"tls"})


def _as_text(explained: dict[str, Any]) -> str:
    lines = [f"host:            {explained['host']}"]
    if explained.get("passthrough"):
        lines.append("route:           none: the mesh does not know this host (passthrough)")
        return "\n".join(lines)
    lines.append(f"virtualService:  {explained['virtualService'] or '(none: default route)'}")
    route = explained["route"]
    if explained["virtualService"] and route is None and not explained["destinations"]:
        lines.append("route:           no route matches: 404 NR")
        return "\n".join(lines)
    if route is not None:
        lines.append(
            f"route:           http[{route['index']}]"
            + (f" {route['name']}" if route["name"] else "")
        )
    if explained["destinations"]:
        lines.append("destinations:")
    for dest in explained["destinations"]:
        subset = f" subset {dest['subset']}" if dest["subset"] else ""
        port = f" port {dest['port']}" if dest["port"] else ""
        endpoints = ", ".join(dest["endpoints"]) or "no endpoints"
        lines.append(f"  {dest['weight']:>6g}%  {dest['host']}{subset}{port} -> {endpoints}")
        if "error" in dest:
            lines.append(f"          ! {dest['error']}")
        for block, settings in (dest.get("trafficPolicy") or {}).items():
            unused = "  (not enforced yet)" if block in _NOT_ENFORCED else ""
            lines.append(f"           {block + ':':<17} {json.dumps(settings)}{unused}")
    lines.extend(f"note:            {note}" for note in explained.get("notes", ()))
    for key in (
        "timeout",
        "retries",
        "fault",
        "mirror",
        "headers",
        "rewrite",
        "redirect",
        "directResponse",
    ):
        value = explained.get(key)
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"{key + ':':<16} {text}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
