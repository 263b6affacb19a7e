"""Host names as Istio resolves them (ISTIO.md §1.9)."""

from __future__ import annotations

from meshlib._text import ascii_int


def to_fqdn(host: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """Expand a short name with the namespace of the resource that names it.

    `reviews` in namespace `foo` -> `reviews.foo.svc.cluster.local`; a name with a dot, a
    wildcard and an IP are left as they are.
    """
    host = host.lower()
    if "." in host or ":" in host or host.startswith("*"):
        return host  # already qualified, a wildcard, or an IP address (IPv4 has dots)
    return f"{host}.{namespace}.svc.{cluster_domain}"


def strip_port(authority: str) -> tuple[str, int | None]:
    """`reviews:9080` -> (`reviews`, 9080); `[::1]:80` -> (`::1`, 80)."""
    host, port = authority, None
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            host = authority[1:end]
            rest = authority[end + 1 :]
            if rest.startswith(":"):
                port = ascii_int(rest[1:], 5)
        return host.lower(), port
    head, sep, tail = authority.rpartition(":")
    given = ascii_int(tail, 5) if sep and ":" not in head else None
    if given is not None:
        host, port = head, given
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
