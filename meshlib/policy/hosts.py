"""Host names as Istio resolves them (ISTIO.md §1.9)."""

from __future__ import annotations


def to_fqdn(host: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """Expand a short name with the namespace of the resource that names it.

    `reviews` in namespace `foo` -> `reviews.foo.svc.cluster.local`; a name with a dot, a
    wildcard and an IP are left as they are.
    """
    host = host.lower()
    if "." in host or ":" in host or host.startswith("*"):
        return host  # already qualified, a wildcard, or an IP address (IPv4 has dots)
    return f"{host}.{namespace}.svc.{cluster_domain}"


def _digits(text: str) -> bool:
    """A port's digits: ASCII only (`str.isdigit` also takes `²`, which `int` refuses), and
    at most five (`int` refuses strings of thousands of digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 5


def strip_port(authority: str) -> tuple[str, int | None]:
    """`reviews:9080` -> (`reviews`, 9080); `[::1]:80` -> (`::1`, 80)."""
    host, port = authority, None
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            host = authority[1:end]
            rest = authority[end + 1 :]
            if rest.startswith(":") and _digits(rest[1:]):
                port = int(rest[1:])
        return host.lower(), port
    head, sep, tail = authority.rpartition(":")
    if sep and _digits(tail) and ":" not in head:
        host, port = head, int(tail)
    return host.lower(), port


def short_forms(fqdn: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """Names a client in `namespace` may use for a Kubernetes-style FQDN.

    `reviews.default.svc.cluster.local` seen from `default`: `reviews`, `reviews.default`,
    `reviews.default.svc`; from another namespace only the last two.
    """
    suffix = f".svc.{cluster_domain}"
    if not fqdn.endswith(suffix):
        return []
    name_ns = fqdn[: -len(suffix)]
    if name_ns.count(".") != 1:
        return []
    name, ns = name_ns.split(".")
    forms = [name_ns, f"{name_ns}.svc"]
    if ns == namespace:
        forms.insert(0, name)
    return forms


def wildcard_matches(pattern: str, host: str) -> bool:
    """`*.example.com` matches `a.example.com` and `a.b.example.com`; `*` matches all."""
    if pattern == "*":
        return True
    return pattern.startswith("*") and host.endswith(pattern[1:])
