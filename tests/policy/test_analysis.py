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
    assert subset.line == 22  # 12 lines of ServiceEntry, `---`, then the VirtualService's line 9
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
