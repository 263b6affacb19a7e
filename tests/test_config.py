"""MeshConfig from keyword arguments and from the environment."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from meshlib import ConfigError, MeshConfig


def test_keyword_arguments_set_identity_and_labels() -> None:
    """service and version become the app and version labels, and the workload name."""
    config = MeshConfig.create(service="reviews", version="v2", namespace="bookinfo")
    assert config.labels == {"app": "reviews", "version": "v2"}
    assert config.workload == "reviews"
    assert config.canonical_service == "reviews"
    assert config.canonical_revision == "v2"
    assert config.principal == "spiffe://cluster.local/ns/bookinfo/sa/default"


def test_environment_variables() -> None:
    """Every MESHLIB_* variable is read and parsed."""
    env = {
        "MESHLIB_SERVICE": "ratings",
        "MESHLIB_VERSION": "v1",
        "MESHLIB_NAMESPACE": "shop",
        "MESHLIB_LABELS": "team=web, tier=backend",
        "MESHLIB_SERVICE_ACCOUNT": "ratings-sa",
        "MESHLIB_TRUST_DOMAIN": "example.org",
        "MESHLIB_CLUSTER": "east",
        "MESHLIB_POLICY": "/etc/mesh",
        "MESHLIB_PROPAGATE_HEADERS": "End-User,x-user-group",
        "MESHLIB_METRICS_PORT": "9102",
    }
    config = MeshConfig.from_env(env)
    assert config.service == "ratings"
    assert config.namespace == "shop"
    assert config.labels == {"team": "web", "tier": "backend", "app": "ratings", "version": "v1"}
    assert config.service_account == "ratings-sa"
    assert config.principal == "spiffe://example.org/ns/shop/sa/ratings-sa"
    assert config.cluster == "east"
    assert config.policy == "/etc/mesh"
    assert config.propagate_headers == ("end-user", "x-user-group")
    assert config.metrics_port == 9102


def test_downward_api_names() -> None:
    """POD_NAMESPACE, SERVICE_ACCOUNT and POD_NAME fill in what MESHLIB_* leaves out."""
    env = {
        "POD_NAMESPACE": "bookinfo",
        "SERVICE_ACCOUNT": "bookinfo-reviews",
        "POD_NAME": "reviews-v2-7d8f9c6b5d-x2x7q",
    }
    config = MeshConfig.from_env(env)
    assert config.namespace == "bookinfo"
    assert config.service_account == "bookinfo-reviews"
    assert config.workload == "reviews-v2"


def test_meshlib_variables_win_over_downward_api() -> None:
    """MESHLIB_NAMESPACE takes precedence over POD_NAMESPACE."""
    config = MeshConfig.from_env({"MESHLIB_NAMESPACE": "a", "POD_NAMESPACE": "b"})
    assert config.namespace == "a"


def test_keyword_arguments_win_over_environment() -> None:
    """Arguments to from_env override the environment."""
    config = MeshConfig.from_env({"MESHLIB_SERVICE": "a"}, service="b")
    assert config.service == "b"


def test_metrics_port_off() -> None:
    """MESHLIB_METRICS_PORT=off disables the metrics port."""
    assert MeshConfig.from_env({"MESHLIB_METRICS_PORT": "off"}).metrics_port is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"MESHLIB_METRICS_PORT": "abc"}, "MESHLIB_METRICS_PORT='abc'", id="port-text"),
        pytest.param(
            {"MESHLIB_METRICS_PORT": "70000"}, "MESHLIB_METRICS_PORT='70000'", id="port-range"
        ),
        pytest.param({"MESHLIB_NAMESPACE": "Bad_NS"}, "MESHLIB_NAMESPACE='Bad_NS'", id="namespace"),
        pytest.param(
            {"POD_NAMESPACE": "Bad_NS"}, "POD_NAMESPACE='Bad_NS'", id="downward-namespace"
        ),
        pytest.param({"MESHLIB_LABELS": "novalue"}, "MESHLIB_LABELS='novalue'", id="labels-format"),
        pytest.param({"MESHLIB_LABELS": "a=b c"}, "MESHLIB_LABELS='a=b c'", id="labels-value"),
        pytest.param(
            {"MESHLIB_PROPAGATE_HEADERS": "ok,bad header"}, "MESHLIB_PROPAGATE_HEADERS", id="header"
        ),
        pytest.param({"MESHLIB_SERVICE": "no spaces"}, "MESHLIB_SERVICE='no spaces'", id="service"),
        pytest.param(
            {"MESHLIB_METRICS_HOST": "localhost:9"}, "MESHLIB_METRICS_HOST='localhost:9'", id="host"
        ),
        pytest.param({"POD_IP": "10.1.2"}, "POD_IP='10.1.2'", id="pod-ip"),
    ],
)
def test_bad_environment_value_names_the_variable(env: dict[str, str], message: str) -> None:
    """A bad value raises ConfigError (a ValueError) naming the variable and its value."""
    with pytest.raises(ConfigError, match=message) as info:
        MeshConfig.from_env(env)
    assert isinstance(info.value, ValueError)


def test_bad_keyword_argument_is_named() -> None:
    """A bad keyword argument raises ConfigError naming it; unknown ones list what is allowed."""
    with pytest.raises(ConfigError, match="metrics_port=-1"):
        MeshConfig.create(metrics_port=-1)
    with pytest.raises(ConfigError, match=r"allowed: .*service"):
        MeshConfig.create(servce="x")


def test_config_is_immutable() -> None:
    """MeshConfig cannot be changed after creation."""
    config = MeshConfig.create(service="a")
    with pytest.raises(AttributeError):
        config.service = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.labels["x"] = "y"  # type: ignore[index]


def test_metrics_listen_on_the_configured_host() -> None:
    """MESHLIB_METRICS_HOST picks the address; every interface by default, as Istio's 15020."""
    import urllib.request

    from meshlib.mesh import Mesh

    assert MeshConfig().metrics_host == "0.0.0.0"
    config = MeshConfig.from_env({"MESHLIB_METRICS_HOST": "127.0.0.1", "MESHLIB_METRICS_PORT": "0"})
    with Mesh(config, watch=False) as mesh:
        server = mesh.serve_metrics()
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/stats/prometheus") as response:
            assert response.status == 200


def test_instance_ip_from_meshlib_istio_or_downward_api_names() -> None:
    """MESHLIB_INSTANCE_IP, else INSTANCE_IP (what Istio's injector sets), else POD_IP."""
    assert MeshConfig.from_env({"POD_IP": "10.0.0.7"}).instance_ip == "10.0.0.7"
    env = {"POD_IP": "10.0.0.7", "INSTANCE_IP": "10.0.0.8"}
    assert MeshConfig.from_env(env).instance_ip == "10.0.0.8"
    env["MESHLIB_INSTANCE_IP"] = "fd00::9"
    assert MeshConfig.from_env(env).instance_ip == "fd00::9"
    assert MeshConfig.from_env({}).instance_ip is None


def test_configuring_the_default_mesh_again_keeps_its_metrics_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`meshlib.configure()` a second time: the new default Mesh serves on the same port (the
    old one lets it go first), and the scrape reads the new Mesh's metrics."""
    import socket
    import urllib.request

    import meshlib
    from meshlib import mesh as mesh_module

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MESHLIB_METRICS_PORT", str(port))
    monkeypatch.setenv("MESHLIB_METRICS_HOST", "127.0.0.1")
    try:
        first = meshlib.configure(service="reviews", version="v1")
        assert first.metrics_server is not None and first.metrics_server.port == port
        second = meshlib.configure(service="reviews", version="v2")
        assert second.metrics_server is not None and second.metrics_server.port == port
        assert first.metrics_server is None  # closed with its Mesh
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
    finally:
        mesh_module.reset()


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        pytest.param({}, True, id="nameless"),
        pytest.param({"service": "reviews"}, False, id="a-service"),
        pytest.param({"workload": "reviews-v1"}, False, id="a-workload"),
    ],
)
def test_a_default_mesh_without_a_name_says_so(
    caplog: pytest.LogCaptureFixture, settings: dict[str, str], warned: bool
) -> None:
    """`meshlib.configure()` with neither MESHLIB_SERVICE nor a workload serves on, but logs
    one warning saying its series and spans will name the workload "unknown" (a forgotten
    variable otherwise shows only as dashboards full of "unknown")."""
    import meshlib
    from meshlib import mesh as mesh_module

    try:
        with caplog.at_level("WARNING", logger="meshlib"):
            meshlib.configure(metrics_port=None, **settings)
    finally:
        mesh_module.reset()
    named = [r for r in caplog.records if "names no workload" in r.getMessage()]
    assert len(named) == warned
    if warned:
        assert "MESHLIB_SERVICE" in named[0].getMessage()


def test_an_empty_meshlib_variable_lets_the_kubernetes_one_through() -> None:
    """`MESHLIB_NAMESPACE=""` (a manifest that sets it from an empty value) is unset: the
    Downward API name is read, as with the variable absent."""
    env = {
        "MESHLIB_NAMESPACE": "",
        "POD_NAMESPACE": "prod",
        "MESHLIB_SERVICE_ACCOUNT": "",
        "SERVICE_ACCOUNT": "reviews-sa",
        "MESHLIB_INSTANCE_IP": "",
        "INSTANCE_IP": "10.2.2.2",
    }
    config = MeshConfig.from_env(env)
    assert (config.namespace, config.service_account, config.instance_ip) == (
        "prod",
        "reviews-sa",
        "10.2.2.2",
    )
    assert config.principal == "spiffe://cluster.local/ns/prod/sa/reviews-sa"


@pytest.mark.parametrize("raw", ["1_000", " 9090", "٣", "+80", "0x50"])
def test_a_metrics_port_is_ascii_digits(raw: str) -> None:
    with pytest.raises(ConfigError, match="MESHLIB_METRICS_PORT"):
        MeshConfig.from_env({"MESHLIB_METRICS_PORT": raw})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("namespace", "Not Valid"),
        ("metrics_port", "x"),
        ("service_account", "Bad SA"),
        ("service_account", "bad/sa"),
        ("trust_domain", "bad domain/x"),
        ("trust_domain", None),
        ("cluster_domain", ".."),
        ("workload", "bad workload"),
        ("instance_ip", 12),
        ("propagate_headers", ("end user",)),
    ],
)
def test_the_constructor_checks_what_it_is_given(field: str, value: object) -> None:
    """`MeshConfig(...)`, as the docs write it, checks each value as `create()` and `from_env`
    do: an identity that would end up in the SPIFFE principal and metric labels must be
    well-formed."""
    with pytest.raises(ConfigError, match=field):
        MeshConfig(**{field: value})  # type: ignore[arg-type]


def test_propagated_headers_may_be_given_as_one_string() -> None:
    config = MeshConfig(propagate_headers="End-User, x-user-group")  # type: ignore[arg-type]
    assert config.propagate_headers == ("end-user", "x-user-group")


def test_a_missing_policy_path_is_a_config_error_naming_its_source(tmp_path: Path) -> None:
    from meshlib.errors import PolicyPathError
    from meshlib.mesh import Mesh

    missing = tmp_path / "nonexistent.yaml"
    with pytest.raises(PolicyPathError, match="MESHLIB_POLICY") as raised:
        Mesh(MeshConfig(policy=str(missing), metrics_port=None))
    assert isinstance(raised.value, ConfigError) and isinstance(raised.value, FileNotFoundError)


@pytest.mark.parametrize("separator", [",", ":", " "])
def test_several_policy_paths_in_one_variable_are_explained(
    tmp_path: Path, separator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MESHLIB_POLICY names one file or folder: two existing files run together are not
    just "does not exist", the error says what to do instead."""
    from meshlib.errors import PolicyPathError
    from meshlib.mesh import Mesh

    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("# no policy\n")
    monkeypatch.chdir(tmp_path)
    config = MeshConfig.from_env({"MESHLIB_POLICY": f"a.yaml{separator}b.yaml"}, metrics_port=None)
    with pytest.raises(PolicyPathError, match="does not exist") as raised:
        Mesh(config)
    assert "names 2 paths that do exist, but a policy path is one file or folder" in str(
        raised.value
    )


def test_a_policy_error_survives_pickling() -> None:
    """Across processes (multiprocessing, a ProcessPoolExecutor), a PolicyError keeps its
    diagnostics."""
    import copy
    import pickle

    from meshlib.errors import Diagnostic, PolicyError

    error = PolicyError([Diagnostic("error", "must be >= 0", "mesh.yaml", 14, "VS a/b", "w")])
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert again.diagnostics == error.diagnostics
        assert str(again) == str(error) and again.line == 14


UNPROPAGATABLE = [
    "content-length",
    "Transfer-Encoding",
    "connection",
    "host",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "trailer",
    ":authority",
]


@pytest.mark.parametrize("header", UNPROPAGATABLE)
def test_framing_and_hop_by_hop_headers_are_not_propagated(header: str) -> None:
    """Headers that would break every outbound call are refused, from the variable or the
    argument, naming it and saying why."""
    with pytest.raises(ConfigError, match=r"MESHLIB_PROPAGATE_HEADERS=.*cannot be propagated"):
        MeshConfig.from_env({"MESHLIB_PROPAGATE_HEADERS": f"end-user,{header}"})
    with pytest.raises(ConfigError, match=r"propagate_headers=.*hop-by-hop"):
        MeshConfig.create(propagate_headers=("end-user", header))


def test_headers_meshlib_propagates_itself_may_be_listed() -> None:
    """`traceparent` or `x-request-id` listed is harmless: the propagator carries them on once,
    as its formats do, so they are accepted."""
    from meshlib.telemetry.propagation import Propagator

    config = MeshConfig.from_env({"MESHLIB_PROPAGATE_HEADERS": "traceparent,x-request-id"})
    assert config.propagate_headers == ("traceparent", "x-request-id")
    assert Propagator(config.propagate_headers).propagate_headers == ()  # left to the formats


@pytest.mark.parametrize(
    ("env", "override"),
    [
        pytest.param({"MESHLIB_METRICS_PORT": "abc"}, {"metrics_port": 9090}, id="port"),
        pytest.param({"MESHLIB_METRICS_PORT": "abc"}, {"metrics_port": None}, id="port-off"),
        pytest.param({"MESHLIB_NAMESPACE": "Bad_NS"}, {"namespace": "shop"}, id="namespace"),
        pytest.param({"POD_NAMESPACE": "Bad_NS"}, {"namespace": "shop"}, id="downward"),
        pytest.param({"POD_IP": "10.1.2"}, {"instance_ip": "10.0.0.1"}, id="pod-ip"),
        pytest.param({"POD_NAME": "Weird_Pod!"}, {"workload": "reviews"}, id="pod-name"),
    ],
)
def test_a_variable_an_argument_overrides_is_not_parsed(
    env: dict[str, str], override: dict[str, object]
) -> None:
    """Keyword arguments win over the environment: a bad value they override is no error."""
    config = MeshConfig.from_env(env, **override)
    for name, value in override.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"MESHLIB_METRICS_PORT": "70000"},
            "MESHLIB_METRICS_PORT='70000': must be a port number 0-65535 (0 picks a free port),"
            " or 'off'",
            id="port-range",
        ),
        pytest.param(
            {"MESHLIB_METRICS_PORT": "abc"},
            "MESHLIB_METRICS_PORT='abc': must be a port number 0-65535 (0 picks a free port),"
            " or 'off'",
            id="port-text",
        ),
        pytest.param(
            {"POD_NAME": "Weird_Pod!"},
            "POD_NAME='Weird_Pod!': must be a Kubernetes workload name, e.g. reviews-v2",
            id="pod-name",
        ),
        pytest.param(
            {"POD_NAME": "web!-7d8f9c6b5d-x2x7q"},
            "POD_NAME='web!-7d8f9c6b5d-x2x7q': must be a Kubernetes workload name",
            id="pod-of-deployment",
        ),
        pytest.param(
            {"MESHLIB_LABELS": "app=a b"},
            "MESHLIB_LABELS='app=a b': 'a b' is not a valid value for label 'app' (up to 63",
            id="label-value",
        ),
    ],
)
def test_an_environment_error_names_the_variable_as_given(
    env: dict[str, str], message: str
) -> None:
    """The message names the variable and its raw value and says what is accepted, in the
    variable's terms (`'off'`, not the keyword argument's `None`)."""
    with pytest.raises(ConfigError) as info:
        MeshConfig.from_env(env)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        pytest.param(
            lambda: MeshConfig.from_env({"MESHLIB_LABELS": "version=v9", "MESHLIB_VERSION": "v1"}),
            "MESHLIB_LABELS='version=v9' sets label version='v9' but MESHLIB_VERSION='v1'",
            id="variables",
        ),
        pytest.param(
            lambda: MeshConfig.create(labels={"version": "v9"}, version="v1"),
            "labels={'version': 'v9'} sets label version='v9' but version='v1'",
            id="arguments",
        ),
        pytest.param(
            lambda: MeshConfig.from_env({"MESHLIB_LABELS": "team=web,app=x"}, service="reviews"),
            "MESHLIB_LABELS='team=web,app=x' sets label app='x' but service='reviews'",
            id="app-and-service",
        ),
        pytest.param(
            lambda: MeshConfig(labels={"app": "x"}, service="reviews"),
            "labels={'app': 'x'} sets label app='x' but service='reviews'",
            id="constructor",
        ),
    ],
)
def test_labels_that_contradict_service_or_version_are_refused(
    build: Callable[[], MeshConfig], message: str
) -> None:
    """`app` and `version` labels must agree with `service` and `version`: otherwise the
    config says v1 while metrics and subsets see v9."""
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value).startswith(message)


def test_labels_that_repeat_service_and_version_are_fine() -> None:
    """Equal values are no conflict."""
    env = {"MESHLIB_LABELS": "app=reviews,version=v1", "MESHLIB_VERSION": "v1"}
    config = MeshConfig.from_env(env, service="reviews")
    assert config.labels == {"app": "reviews", "version": "v1"}


def test_propagators_from_opentelemetrys_variable() -> None:
    """OTEL_PROPAGATORS says which trace formats every call sends, as it does for
    OpenTelemetry's SDK; MESHLIB_PROPAGATORS, when set, wins; `none` sends only the formats a
    served request arrived in."""
    assert MeshConfig.from_env({}).propagators == ("tracecontext", "baggage")
    otel = {"OTEL_PROPAGATORS": "B3Multi, tracecontext"}
    assert MeshConfig.from_env(otel).propagators == ("b3multi", "tracecontext")
    both = {**otel, "MESHLIB_PROPAGATORS": "b3"}
    assert MeshConfig.from_env(both).propagators == ("b3",)
    assert MeshConfig.from_env({"OTEL_PROPAGATORS": "none"}).propagators == ()
    assert MeshConfig(propagators="tracecontext,b3").propagators == ("tracecontext", "b3")


def test_a_format_meshlib_cannot_send_is_an_error() -> None:
    """Asked of meshlib itself (MESHLIB_PROPAGATORS, MeshConfig), a format it has no
    propagator for is refused, naming where it came from and what it sends."""
    with pytest.raises(ConfigError, match="MESHLIB_PROPAGATORS='jaeger'") as raised:
        MeshConfig.from_env({"MESHLIB_PROPAGATORS": "jaeger"})
    assert "tracecontext, baggage, b3, b3multi" in str(raised.value)
    with pytest.raises(ConfigError, match="propagators="):
        MeshConfig(propagators=("zipkin",))
    with pytest.raises(ConfigError, match="propagators=5"):
        MeshConfig(propagators=5)  # type: ignore[arg-type]
    assert MeshConfig(propagators="None").propagators == ()
    assert MeshConfig(propagators=["B3", "TraceContext"]).propagators == ("b3", "tracecontext")


def test_formats_of_the_apps_own_opentelemetry_setup_are_left_to_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OTEL_PROPAGATORS belongs to the app's OpenTelemetry setup too, which may list formats
    meshlib cannot send (AWS's `xray`): meshlib sends the others (its default when none is
    left) and warns, naming the variable, rather than refusing to start."""
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        config = MeshConfig.from_env({"OTEL_PROPAGATORS": "xray,tracecontext,b3multi"})
    assert config.propagators == ("tracecontext", "b3multi")
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "meshlib"]
    assert "OTEL_PROPAGATORS='xray,tracecontext,b3multi'" in warning and "xray" in warning
    assert "MESHLIB_PROPAGATORS" in warning
    assert MeshConfig.from_env({"OTEL_PROPAGATORS": "xray"}).propagators == (
        "tracecontext",
        "baggage",
    )


@pytest.fixture
def unwarned(monkeypatch: pytest.MonkeyPatch) -> None:
    """No misspelt variable warned about yet in this process (each is, once)."""
    import meshlib.config

    monkeypatch.setattr(meshlib.config, "_warned_misspelt", set())


@pytest.mark.usefixtures("unwarned")
@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("MESHLIB_SERVCE", "MESHLIB_SERVICE"),
        ("MESHLIB_METRIC_PORT", "MESHLIB_METRICS_PORT"),
        ("meshlib_policy", "MESHLIB_POLICY"),
        ("MESHLIB_TRACE_EXPORTER", "MESHLIB_TRACES_EXPORTER"),
    ],
)
def test_a_misspelt_variable_is_named_with_the_one_meant(
    variable: str, meant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A misspelt variable would be ignored without a word (the workload then runs unnamed,
    or without its policy): a warning names it and the variable meant."""
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        config = MeshConfig.from_env({variable: "reviews"})
    assert config.service is None and config.policy is None  # still ignored
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "meshlib"]
    assert variable in warning and f"did you mean {meant}?" in warning


@pytest.mark.usefixtures("unwarned")
def test_a_misspelt_variable_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    """Configuration is read again and again (a default Mesh that failed to build is tried
    on every meshed call): the warning comes once a process, not once a call."""
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        for _ in range(3):
            MeshConfig.from_env({"MESHLIB_SERVCE": "reviews"})
    assert len([r for r in caplog.records if r.name == "meshlib"]) == 1


def test_an_apps_own_meshlib_variables_are_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Names far from any meshlib reads (an app's own, one a Telemetry `environment` tag
    reads) and the ones it reads draw no warning."""
    env = {
        "MESHLIB_SERVICE": "reviews",
        "MESHLIB_ACCESS_LOG": "on",
        "MESHLIB_TEST_REGION": "eu",
        "MESHLIB_DEBUG": "1",
        "SERVICE": "x",
    }
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        MeshConfig.from_env(env)
    assert not [r for r in caplog.records if r.name == "meshlib"]
