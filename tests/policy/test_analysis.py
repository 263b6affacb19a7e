"""`meshlib check`'s cross-resource analysis: each finding, where it is reported, and the
configurations that must not produce it."""

from __future__ import annotations

import textwrap

from meshlib.errors import Diagnostic
from meshlib.policy.analysis import analyze
from meshlib.policy.lines import FieldLines
from meshlib.policy.loader import load_paths, load_text
from tests.conftest import BOOKINFO

REVIEWS_SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {app: reviews, version: v1}}
  - {address: 10.0.0.2, labels: {app: reviews, version: v2}}
"""


def findings(*documents: str) -> list[Diagnostic]:
    """Load the documents as one file, as `meshlib check` does, and analyze them."""
    text = "---\n".join(textwrap.dedent(d).strip() + "\n" for d in documents)
    result = load_text(text, "mesh.yaml", keep_lines=True)
    assert result.errors == (), result.errors
    return analyze(result.resources, lines=result.lines)


def lines_of(*documents: str) -> list[str]:
    return [str(d) for d in findings(*documents)]


# -- field lines ------------------------------------------------------------------------------


def test_findings_are_reported_at_the_line_of_their_field() -> None:
    """A destination's finding names the line of that destination's field, not the resource's."""
    (subset,) = [
        d
        for d in findings(
            REVIEWS_SE,
            """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              http:
              - route:
                - destination:
                    host: reviews
                    subset: v9
            """,
        )
        if d.field is not None and d.field.endswith("subset")
    ]
    assert subset.line == 22  # 11 lines of ServiceEntry, `---`, then the VirtualService's 10th
    assert subset.field == "spec.http[0].route[0].destination.subset"


def test_without_kept_lines_findings_stay_at_the_resource_line() -> None:
    """The plain load path keeps no positions: analysis falls back to the resource's line."""
    text = textwrap.dedent(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v9}
        """
    )
    result = load_text(text, "mesh.yaml")
    assert result.lines == {}
    assert {d.line for d in analyze(result.resources)} == {1}


def test_field_lines_of_list_items_and_dotted_keys() -> None:
    """Resources inside a `kind: List` get their own lines; keys with dots or brackets (label
    and header names) are found whole."""
    text = textwrap.dedent(
        """\
        apiVersion: v1
        kind: List
        items:
        - apiVersion: networking.istio.io/v1
          kind: VirtualService
          metadata: {name: a}
          spec:
            hosts: [a]
            http:
            - match:
              - queryParams:
                  page.size: {exact: '10'}
              route:
              - destination: {host: a}
        """
    )
    result = load_text(text, "list.yaml", keep_lines=True)
    (resource,) = result.resources
    lines = result.lines[resource.origin]
    assert isinstance(lines, FieldLines)
    assert lines.line(None) == resource.origin.line == 4
    assert lines.line("spec.http[0].match[0].queryParams.page.size.exact") == 12
    assert lines.line("spec.http[0].match[0].queryParams['page.size']") == 12
    assert lines.line(("spec", "http", 0, "route", 0, "destination", "host")) == 14
    assert lines.line("spec.http[0].nothing.here") == 10  # the deepest field that exists
    assert lines.line("spec.http[7]") == 9


def test_load_paths_keeps_lines_per_file(tmp_path: object) -> None:
    """`load_paths(..., keep_lines=True)` keeps lines for the resources of every file."""
    result = load_paths(
        [BOOKINFO / "services.yaml", BOOKINFO / "networking" / "destination-rule-all.yaml"],
        keep_lines=True,
    )
    assert set(result.lines) == {r.origin for r in result.resources}
    assert load_paths([BOOKINFO / "services.yaml"]).lines == {}


def vs(name: str, spec: str, namespace: str = "default") -> str:
    """A VirtualService document with `spec` (YAML, indented by two)."""
    return (
        f"apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec).strip(), "  ")
        + "\n"
    )


def about(field_end: str, found: list[Diagnostic]) -> list[Diagnostic]:
    return [d for d in found if d.field is not None and d.field.endswith(field_end)]


# -- destination hosts (Istio IST0101 ReferencedResourceNotFound) -----------------------------


def test_a_destination_host_no_service_entry_names_is_an_error() -> None:
    """Route and mirror hosts that name no known service are errors at the host's line."""
    found = findings(
        REVIEWS_SE,
        vs(
            "reviews",
            """
            hosts: [reviews]
            http:
            - route:
              - destination: {host: reviewz}
              mirror: {host: shadow.example.com}
            """,
        ),
    )
    route, mirror = about("host", found)
    assert route.severity == mirror.severity == "error"
    assert route.field == "spec.http[0].route[0].destination.host" and route.line == 20
    assert "host reviewz.default.svc.cluster.local is not in the registry" in route.message
    assert mirror.field == "spec.http[0].mirror.host" and mirror.line == 21
    assert mirror.message.startswith("mirror host shadow.example.com is not in the registry")


def test_known_hosts_exact_wildcard_and_short_names_are_not_reported() -> None:
    """A short name expanded in the VirtualService's namespace, an FQDN, and a host under a
    wildcard ServiceEntry are all known."""
    found = findings(
        REVIEWS_SE,
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: external}
        spec:
          hosts: ["*.example.com"]
          ports: [{number: 443, name: https, protocol: HTTPS}]
          resolution: NONE
        """,
        vs(
            "reviews",
            """
            hosts: [reviews]
            http:
            - route:
              - destination: {host: reviews}
                weight: 1
              - destination: {host: reviews.default.svc.cluster.local}
                weight: 1
              - destination: {host: api.example.com}
                weight: 1
            """,
        ),
    )
    assert found == []


def test_a_service_entry_not_exported_to_the_namespace_is_not_known_there() -> None:
    """As Istio's analyzer: the ServiceEntry must be visible in the VirtualService's
    namespace (`exportTo: ['.']` keeps it in its own)."""
    private = REVIEWS_SE.replace("spec:\n", "spec:\n  exportTo: ['.']\n", 1)
    route = vs(
        "r",
        "hosts: [r.example.com]\nhttp: [{route: [{destination: {host: reviews.default.svc.cluster.local}}]}]",
        namespace="shop",
    )
    assert [d.field for d in findings(private, route)] == ["spec.http[0].route[0].destination.host"]
    assert findings(REVIEWS_SE, route) == []


# -- one host, two VirtualServices (Istio IST0109 ConflictingMeshGatewayVirtualServiceHosts) ---


def test_a_host_claimed_by_two_virtual_services_is_an_error_naming_both() -> None:
    """Each VirtualService gets an error at its `hosts` entry naming the other; the message
    says which one the sidecar uses."""
    route = "http: [{route: [{destination: {host: reviews}}]}]"
    found = findings(
        REVIEWS_SE,
        vs("first", f"hosts: [ratings.example.com, reviews]\n{route}"),
        vs("second", f"hosts: [reviews.default.svc.cluster.local]\n{route}"),
    )
    first, second = about("]", found)
    assert first.severity == second.severity == "error"
    assert (first.resource, first.field) == ("VirtualService default/first", "spec.hosts[1]")
    assert (second.resource, second.field) == ("VirtualService default/second", "spec.hosts[0]")
    assert "also claimed by VirtualService default/second" in first.message
    assert "also claimed by VirtualService default/first" in second.message
    assert "(here default/first: it is older)" in second.message


def test_virtual_services_no_namespace_sees_together_do_not_conflict() -> None:
    """Two VirtualServices for one host, each private to its own namespace, or one only for
    a gateway, never meet in a sidecar."""
    route = "http: [{route: [{destination: {host: reviews.default.svc.cluster.local}}]}]"
    host = "hosts: [reviews.default.svc.cluster.local]"
    apart = findings(
        REVIEWS_SE,
        vs("a", f"{host}\nexportTo: ['.']\n{route}", namespace="team-a"),
        vs("b", f"{host}\nexportTo: ['.']\n{route}", namespace="team-b"),
        vs("c", f"{host}\ngateways: [ingress]\n{route}"),
    )
    assert [d.field for d in apart] == ["spec.gateways"]
    mixed = findings(
        REVIEWS_SE,
        vs("a", f"{host}\nexportTo: ['.']\n{route}", namespace="team-a"),
        vs("b", f"{host}\n{route}", namespace="team-b"),
    )
    assert len(about("hosts[0]", mixed)) == 2  # the public one is seen in team-a too


# -- destination ports (IST0101 host:port, IST0112 VirtualServiceDestinationPortSelectorRequired)

MULTI_PORT_SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 8080, name: http-admin, protocol: HTTP}
  resolution: DNS
"""


def test_a_destination_port_the_service_does_not_have_is_an_error() -> None:
    """A port number that is none of the ServiceEntry's ports: an error at port.number."""
    found = findings(
        REVIEWS_SE,
        vs(
            "reviews",
            """
            hosts: [reviews]
            http:
            - route:
              - destination:
                  host: reviews
                  port: {number: 9090}
            """,
        ),
    )
    (port,) = found
    assert (port.severity, port.field, port.line) == (
        "error",
        "spec.http[0].route[0].destination.port.number",
        22,
    )
    assert "has no port 9090 (ports of ServiceEntry default/reviews: 9080)" in port.message


def test_a_multi_port_service_needs_a_destination_port() -> None:
    """No port for a service with several: an error; a port it has, or a one-port service
    without port: nothing."""
    routes = """
    hosts: [api.example.com]
    http:
    - match: [{uri: {prefix: /a}}]
      route: [{destination: {host: api.example.com}}]
    - match: [{uri: {prefix: /b}}]
      route: [{destination: {host: api.example.com, port: {number: 8080}}}]
    - route: [{destination: {host: reviews}}]
    """
    (missing,) = findings(REVIEWS_SE, MULTI_PORT_SE, vs("api", routes))
    assert (missing.severity, missing.field) == ("error", "spec.http[0].route[0].destination.port")
    assert missing.line == 30  # the destination's line: the port it lacks has none
    assert "api.example.com has several ports (80, 8080" in missing.message


# -- DestinationRules: unknown hosts, subsets without endpoints --------------------------------


def dr(spec: str, name: str = "reviews") -> str:
    return (
        f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\n"
        "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip(), "  ") + "\n"
    )


def test_a_subset_that_selects_no_endpoint_is_an_error() -> None:
    """A subset whose labels no workload of the service has: an error at its labels; subsets
    that select some, or select all (no labels), are fine."""
    found = findings(
        REVIEWS_SE,
        dr(
            """
            host: reviews
            subsets:
            - {name: v1, labels: {version: v1}}
            - name: v3
              labels: {version: v3}
            - {name: all}
            """
        ),
    )
    (subset,) = found
    assert (subset.severity, subset.field, subset.line) == ("error", "spec.subsets[1].labels", 21)
    assert subset.message.startswith(
        "subset 'v3' selects no endpoint of reviews.default.svc.cluster.local: none of the 2"
        " workload(s) of ServiceEntry default/reviews has the labels version=v3"
    )


def test_subset_endpoints_come_from_workload_entries_a_selector_picks() -> None:
    """With a workloadSelector, the service's workloads are the WorkloadEntries of its
    namespace that it selects, as the Snapshot finds them."""
    entry = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: ratings}
    spec:
      hosts: [ratings.default.svc.cluster.local]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 9080, name: http, protocol: HTTP}]
      workloadSelector: {labels: {app: ratings}}
    """
    workload = """
    apiVersion: networking.istio.io/v1
    kind: WorkloadEntry
    metadata: {name: ratings-v1, namespace: %s}
    spec: {address: 10.0.0.9, labels: {app: ratings, version: v1}}
    """
    rule = dr("host: ratings\nsubsets: [{name: v1, labels: {version: v1}}]", name="ratings")
    assert findings(entry, workload % "default", rule) == []
    (subset,) = findings(
        entry, workload % "other", workload.replace("version: v1", "version: v2") % "default", rule
    )
    assert subset.field == "spec.subsets[0].labels"  # only default's v2 belongs to the service
    lonely = findings(entry, workload % "other", rule)
    assert lonely == []  # no workloads at all: endpoints unknown, nothing to judge


def test_a_subset_of_a_dns_service_without_endpoints_is_not_judged() -> None:
    """Endpoints that come from DNS carry no labels: meshlib cannot tell what a subset
    selects, so it says nothing."""
    assert (
        findings(
            MULTI_PORT_SE, dr("host: api.example.com\nsubsets: [{name: v1, labels: {v: '1'}}]")
        )
        == []
    )


def test_a_destination_rule_for_an_unknown_host_is_a_warning() -> None:
    """A rule whose host no ServiceEntry names applies to nothing: a warning at spec.host; a
    wildcard rule covering a known host is fine."""
    (unknown,) = findings(REVIEWS_SE, dr("host: ratings"))
    assert (unknown.severity, unknown.field, unknown.line) == ("warning", "spec.host", 17)
    assert "host ratings.default.svc.cluster.local is not in the registry" in unknown.message
    assert findings(REVIEWS_SE, dr('host: "*.svc.cluster.local"')) == []
    (wild,) = findings(REVIEWS_SE, dr('host: "*.example.org"'))
    assert wild.severity == "warning" and "no ServiceEntry has a host under *.example.org" in (
        wild.message
    )


# -- unreachable routes and ineffective matches (IST0130, IST0131) -----------------------------


def reachability(http: str, *extra: str) -> list[Diagnostic]:
    """Findings about routes of a VirtualService for reviews with these `http` routes."""
    found = findings(REVIEWS_SE, vs("reviews", f"hosts: [reviews]\nhttp:\n{http}"), *extra)
    return [d for d in found if "unreachable" in d.message or "never used" in d.message]


ROUTE = "  route: [{destination: {host: reviews}}]\n"


def test_a_route_after_one_without_match_is_unreachable() -> None:
    """A route after a catch-all: a warning at the later route's line, naming the catch-all."""
    (dead,) = reachability(f"- name: all\n{ROUTE}- match: [{{uri: {{prefix: /a}}}}]\n{ROUTE}")
    assert (dead.severity, dead.field, dead.line) == ("warning", "spec.http[1]", 21)
    assert dead.message == "unreachable: the earlier route http[0] 'all' matches every request"


def test_a_block_that_matches_everything_makes_a_catch_all() -> None:
    """`prefix: /` (or a block with nothing in it) matches every request, as no match does;
    `prefix: /api` does not."""
    everything = f"- match: [{{uri: {{prefix: /a}}}}, {{uri: {{prefix: /}}}}]\n{ROUTE}"
    (dead,) = reachability(f"{everything}- match: [{{method: {{exact: GET}}}}]\n{ROUTE}")
    assert dead.field == "spec.http[1]"
    assert reachability(f"- match: [{{uri: {{prefix: /api}}}}]\n{ROUTE}- name: rest\n{ROUTE}") == []


def test_a_block_covered_by_an_earlier_one_is_never_used() -> None:
    """A duplicate, or a narrower prefix under an earlier one with the same other conditions:
    the block is reported; when every block of a route is, the route is unreachable."""
    http = (
        f"- match: [{{uri: {{prefix: /api}}, headers: {{end-user: {{exact: jason}}}}}}]\n{ROUTE}"
        "- match:\n"
        "  - {uri: {prefix: /api/v1}, headers: {end-user: {exact: jason}}}\n"
        "  - {uri: {prefix: /other}}\n"
        f"{ROUTE}"
        "- match:\n"
        "  - {uri: {exact: /api/x}, headers: {end-user: {exact: jason}, x: {}}}\n"
        f"{ROUTE}"
    )
    block, route = reachability(http)
    assert (block.field, block.line) == ("spec.http[1].match[0]", 22)
    assert block.message == (
        "never used: every request it matches is taken first by spec.http[0].match[0]"
        " (route http[0])"
    )
    assert route.field == "spec.http[2].match"
    assert route.message.startswith("unreachable: each of its match blocks is covered")


def test_narrower_first_or_different_conditions_are_reachable() -> None:
    """A longer prefix before a shorter one, a header the earlier block does not ask, another
    method or port: every route is used."""
    http = (
        f"- match: [{{uri: {{prefix: /api/v1}}}}]\n{ROUTE}"
        f"- match: [{{uri: {{prefix: /api}}, headers: {{end-user: {{exact: jason}}}}}}]\n{ROUTE}"
        f"- match: [{{uri: {{prefix: /api}}, port: 9080}}]\n{ROUTE}"
        f"- match: [{{uri: {{prefix: /api}}}}]\n{ROUTE}"
        f"- match: [{{uri: {{prefix: /API}}, ignoreUriCase: true}}]\n{ROUTE}"
        f"- match: [{{uri: {{regex: '/api/.*'}}, method: {{exact: POST}}}}]\n{ROUTE}"
        f"- route: [{{destination: {{host: reviews}}}}]\n"
    )
    assert reachability(http) == []


DELEGATE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-api}
spec:
  http:
  - match: [{uri: {prefix: /api/v1}}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /api/v2}}]
    route: [{destination: {host: reviews}}]
"""


def test_routes_after_a_delegate_route_are_not_unreachable() -> None:
    """Requests a delegate's routes do not take fall through to the next route, so a route
    after a delegating one (even one without match) is reachable; nor are the delegate's own
    routes, with matches, reported."""
    http = (
        "- delegate: {name: reviews-api}\n"
        f"- match: [{{uri: {{prefix: /api}}}}]\n  delegate: {{name: reviews-api}}\n"
        f"- match: [{{uri: {{prefix: /api}}}}]\n{ROUTE}"
        f"- route: [{{destination: {{host: reviews}}}}]\n"
    )
    assert reachability(http, DELEGATE) == []


def test_a_delegate_route_after_a_catch_all_is_reported() -> None:
    """A delegating route placed after a catch-all is dead like any other; inside a delegate,
    a route after its own catch-all is too."""
    (dead,) = reachability(f"- name: all\n{ROUTE}- delegate: {{name: reviews-api}}\n", DELEGATE)
    assert dead.field == "spec.http[1]"
    child = DELEGATE.replace(
        "  - match: [{uri: {prefix: /api/v1}}]\n",
        "  - route: [{destination: {host: reviews}}]\n  - match: [{uri: {prefix: /api/v1}}]\n",
    )
    inner = reachability("- delegate: {name: reviews-api}\n", child)
    assert [(d.resource, d.field) for d in inner] == [
        ("VirtualService default/reviews-api", "spec.http[1]"),
        ("VirtualService default/reviews-api", "spec.http[2]"),
    ]


# -- conflicting Telemetry (MultipleTelemetriesWithoutWorkloadSelectors, ConflictingTelemetry...)


def telemetry(name: str, namespace: str = "istio-system", spec: str = "") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ") or "  tracing: [{}]"
    return (
        f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n"
    )


def test_two_namespace_wide_telemetries_in_one_namespace_are_errors() -> None:
    """Two root-namespace Telemetries without selector: an error on each naming the other;
    one per namespace, or one with a selector beside it, is fine."""
    found = findings(telemetry("mesh-a"), telemetry("mesh-b"))
    assert [(d.severity, d.resource, d.field, d.line) for d in found] == [
        ("error", "Telemetry istio-system/mesh-a", "spec.selector", 4),
        ("error", "Telemetry istio-system/mesh-b", "spec.selector", 10),
    ]
    assert "(istio-system/mesh-b)" in found[0].message
    assert "(istio-system/mesh-a)" in found[1].message
    assert (
        findings(
            telemetry("mesh"),
            telemetry("shop", namespace="shop"),
            telemetry("reviews", spec="selector: {matchLabels: {app: reviews}}\ntracing: [{}]"),
        )
        == []
    )


def test_an_empty_selector_counts_as_none() -> None:
    """`selector: {}` selects the namespace, as no selector does (meshlib's precedence too)."""
    found = findings(telemetry("a", spec="selector: {}\ntracing: [{}]"), telemetry("b"))
    assert len(found) == 2


def test_two_telemetries_selecting_one_workload_are_errors() -> None:
    """Selectors that both select a known workload (a ServiceEntry endpoint here), or where one
    selector's labels contain the other's: errors; disjoint selectors are fine."""
    reviews = "selector: {matchLabels: {app: reviews}}\ntracing: [{}]"
    v1 = "selector: {matchLabels: {version: v1}}\ntracing: [{}]"
    v3 = "selector: {matchLabels: {app: reviews, version: v3}}\ntracing: [{}]"
    found = findings(
        REVIEWS_SE,
        telemetry("by-app", "default", reviews),
        telemetry("by-version", "default", v1),
    )
    assert [(d.resource, d.field) for d in found] == [
        ("Telemetry default/by-app", "spec.selector.matchLabels"),
        ("Telemetry default/by-version", "spec.selector.matchLabels"),
    ]
    assert "as Telemetry default/by-version (a workload labelled app=reviews, version=v1)" in (
        found[0].message
    )
    nested = findings(telemetry("by-app", "default", reviews), telemetry("v3", "default", v3))
    assert len(nested) == 2  # no workload known, but every one v3 selects, by-app selects
    apart = findings(
        REVIEWS_SE,
        telemetry("v1", "default", v1),
        telemetry("v3", "default", v3),
        telemetry("other-ns", "shop", reviews),
    )
    assert apart == []


# -- access logging without a provider (Istio InvalidTelemetryProvider) -----------------------


def log_findings(*documents: str, root: str = "istio-system") -> list[Diagnostic]:
    text = "---\n".join(textwrap.dedent(d).strip() + "\n" for d in documents)
    result = load_text(text, "mesh.yaml", keep_lines=True)
    found = analyze(result.resources, root_namespace=root, lines=result.lines)
    return [d for d in found if d.field is not None and d.field.endswith("providers")]


def test_an_access_log_entry_with_no_provider_to_fall_back_on_is_a_warning() -> None:
    """The mesh's first entry without providers: a warning at the entry (its missing
    `providers`), naming the provider meshlib uses."""
    (entry,) = log_findings(telemetry("mesh", spec="accessLogging: [{}]"))
    assert (entry.severity, entry.field, entry.line) == (
        "warning",
        "spec.accessLogging[0].providers",
        5,
    )
    assert "where meshlib logs it as 'envoy'" in entry.message


def test_an_access_log_entry_that_inherits_providers_is_fine() -> None:
    """Providers named by an earlier entry, or by the mesh's or the namespace's Telemetry above,
    carry over; a `disabled` entry turns nothing on."""
    named = "accessLogging: [{providers: [{name: otel}]}]"
    bare = "accessLogging: [{match: {mode: CLIENT}}]"
    assert log_findings(telemetry("mesh", spec=f"{named[:-1]}, {{}}]")) == []
    assert log_findings(telemetry("mesh", spec=named), telemetry("shop", "shop", bare)) == []
    selected = "selector: {matchLabels: {app: reviews}}\n" + bare
    assert log_findings(telemetry("shop", "shop", named), telemetry("w", "shop", selected)) == []
    assert log_findings(telemetry("mesh", spec="accessLogging: [{disabled: true}]")) == []
    # no parent names one: the namespace's and the workload's entries are both reported
    found = log_findings(telemetry("shop", "shop", bare), telemetry("w", "shop", selected))
    assert [d.resource for d in found] == ["Telemetry shop/shop", "Telemetry shop/w"]


def test_the_mesh_level_is_the_root_namespace_given() -> None:
    """With another root namespace, a Telemetry in istio-system is an ordinary namespace's and
    gives nothing to a third namespace."""
    named = telemetry("mesh", "mesh-root", "accessLogging: [{providers: [{name: envoy}]}]")
    shop = telemetry("shop", "shop", "accessLogging: [{}]")
    assert log_findings(named, shop, root="mesh-root") == []
    assert len(log_findings(named, shop)) == 1
