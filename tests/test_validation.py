"""Bad input gets a typed error that names the field, at the boundary."""

import math

import msgspec
import numpy as np
import pytest

import geoserve as g
from builders import deployment, snapshot, topology

GOOD = {
    "regions": ["us", "eu"],
    "rtt_ms": [[2, 80], [80, 2]],
    "deployments": [
        {"model": "m", "version": "v1", "region": "us", "replicas": [{"id": "a", "endpoint": "10.0.0.1:8000"}]},
        {"model": "m", "version": "v1", "region": "eu", "replicas": [{"id": "b", "endpoint": "10.0.0.2:8000"}]},
    ],
}

GOOD_TOML = """
regions = ["us", "eu"]
rtt_ms = [[2, 80], [80, 2]]

[[deployments]]
model = "m"
version = "v1"
region = "us"
replicas = [{ id = "a", endpoint = "10.0.0.1:8000" }]

[[deployments]]
model = "m"
version = "v1"
region = "eu"
replicas = [{ id = "b", endpoint = "10.0.0.2:8000" }]
"""


def mutate(path, value):
    data = msgspec.json.decode(msgspec.json.encode(GOOD))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


CONFIG_CASES = [
    (("rtt_ms",), [[2, 80]], "rtt_ms"),
    (("rtt_ms", 1), [80], "rtt_ms[1]"),
    (("rtt_ms", 0, 1), -5, "rtt_ms[0][1]"),
    (("rtt_ms", 1, 0), math.nan, "rtt_ms[1][0]"),
    (("rtt_ms", 1, 1), math.inf, "rtt_ms[1][1]"),
    (("rtt_ms", 0, 0), "far", "rtt_ms[0][0]"),
    (("deployments", 1, "region"), "mars", "deployments[1].region"),
    (("deployments", 1, "replicas", 0, "id"), "a", "deployments[1].replicas[0].id"),
    (("deployments", 0, "replicas"), [], "deployments[0].replicas"),
    (("deployments",), [], "deployments"),
    (("deployments", 0, "decode_slots"), 0, "deployments[0].decode_slots"),
    (("deployments", 0, "decode_slots"), "many", "deployments[0].decode_slots"),
    (("deployments", 0, "replicaz"), [], "deployments[0].replicaz"),
    (("deployments", 0, "version"), "", "deployments[0].version"),
    (("regions",), KeyError, "regions"),
    (("regions",), ["us", "us"], "regions[1]"),
    (("aliases",), {"chat": "nope"}, "aliases.chat"),
    (("aliases",), {"chat": "m@v9"}, "aliases.chat"),
    (("aliases",), {"m": "m"}, "aliases.m"),
    (("fallbacks",), {"m": "tiny"}, "fallbacks.m"),
    (("fallbacks",), {"m": "m"}, "fallbacks.m"),
    (("models",), {"m": {"prefill_ms_per_token": -1}}, "models.m.prefill_ms_per_token"),
    (("priorities",), {"interactive": {"local_budget_ms": 800, "cross_budget_ms": 1200, "slot_ceiling": 1.5}}, "priorities.interactive.slot_ceiling"),
    (("priorities",), {"batch": {"local_budget_ms": 800, "cross_budget_ms": 100, "slot_ceiling": 0.5}}, "priorities.batch.cross_budget_ms"),
    (("edges",), ["us"], "edges[0]"),
]


@pytest.mark.parametrize("path,value,field", CONFIG_CASES, ids=[c[2] for c in CONFIG_CASES])
def test_bad_topology_names_the_field(path, value, field):
    with pytest.raises(g.ConfigError) as err:
        g.Topology.from_dict(mutate(path, value))
    assert err.value.field == field
    assert field in str(err.value)


def test_topologies_built_in_code_are_validated_by_the_router():
    bad = topology([deployment("m", "v1", "us", 1), deployment("m", "v1", "us", 1)])  # same ids twice
    with pytest.raises(g.ConfigError) as err:
        g.Router(bad)
    assert err.value.field == "deployments[1].replicas[0].id"


@pytest.mark.parametrize(
    "field,value",
    [("load_bound", 0.5), ("max_fallbacks", 17), ("prefix_index_entries", 100), ("spill_ceiling", 0.0), ("ring_vnodes", 0)],
)
def test_bad_policy_names_the_field(field, value):
    with pytest.raises(g.ConfigError) as err:
        g.Router(topology(), g.Policy(**{field: value}))
    assert err.value.field == f"policy.{field}"


def test_files_in_every_format_load_and_malformed_files_are_config_errors(tmp_path):
    for name, text in {
        "f.json": msgspec.json.encode(GOOD).decode(),
        "f.toml": GOOD_TOML,
        "f.yaml": msgspec.yaml.encode(GOOD).decode(),
    }.items():
        (tmp_path / name).write_text(text)
        assert g.Topology.from_file(tmp_path / name) == g.Topology.from_dict(GOOD)
    (tmp_path / "bad.toml").write_text("regions = [\n")
    with pytest.raises(g.ConfigError) as err:
        g.Topology.from_file(tmp_path / "bad.toml")
    assert err.value.field == "<file>"
    (tmp_path / "typed.toml").write_text(GOOD_TOML.replace('region = "us"', 'region = "us"\nkv_blocks = "lots"'))
    with pytest.raises(g.ConfigError) as err:
        g.Topology.from_file(tmp_path / "typed.toml")
    assert err.value.field == "deployments[0].kv_blocks"
    (tmp_path / "f.ini").write_text("")
    with pytest.raises(g.ConfigError):
        g.Topology.from_file(tmp_path / "f.ini")
    with pytest.raises(g.ConfigError) as err:
        g.Topology.from_file(tmp_path / "absent.toml")
    assert err.value.field == "path"


SIGNAL_CASES = [
    (dict(in_flight=math.nan), "replicas[0].in_flight"),
    (dict(in_flight=-1), "replicas[0].in_flight"),
    (dict(in_flight=2.5), "replicas[0].in_flight"),
    (dict(queue_depth=-3), "replicas[0].queue_depth"),
    (dict(kv_free_blocks=-1), "replicas[0].kv_free_blocks"),
    (dict(tpot_ms=math.inf), "replicas[0].tpot_ms"),
    (dict(tpot_ms=0.0), "replicas[0].tpot_ms"),
    (dict(prefill_ms_per_token=-0.1), "replicas[0].prefill_ms_per_token"),
    (dict(mean_service_ms=math.nan), "replicas[0].mean_service_ms"),
    (dict(observed_ms=math.nan), "replicas[0].observed_ms"),
    (dict(replica="ghost"), "replicas[0].replica"),
]


@pytest.mark.parametrize("fields,field", SIGNAL_CASES, ids=[c[1] + "=" + repr(list(c[0].values())[0]) for c in SIGNAL_CASES])
def test_bad_signals_name_the_field(fields, field):
    r = g.Router(topology())
    sig = g.ReplicaSignal(**{"replica": r.fleet.replica_ids[0], "observed_ms": 0.0, **fields})
    with pytest.raises(g.SignalError) as err:
        r.snapshot(g.Signals(now_ms=0.0, replicas=(sig,)))
    assert err.value.field == field


def test_bad_signal_sets_name_the_field():
    r = g.Router(topology())
    one = g.ReplicaSignal(replica=r.fleet.replica_ids[0], observed_ms=0.0)
    cases = [
        (g.Signals(now_ms=math.nan), "now_ms"),
        (g.Signals(now_ms=0.0, replicas=(one, one)), "replicas[1].replica"),
        (g.Signals(now_ms=0.0, regions_down=("mars",)), "regions_down[0]"),
        (g.Signals(now_ms=0.0, spill=(g.SpillAllowance(rescuer="us", tokens=math.nan),)), "spill[0].tokens"),
        (g.Signals(now_ms=0.0, spill=(g.SpillAllowance(rescuer="us", tokens=-1.0),)), "spill[0].tokens"),
        (g.Signals(now_ms=0.0, spill=(g.SpillAllowance(rescuer="mars", tokens=1.0),)), "spill[0].rescuer"),
        (g.Signals(now_ms=0.0, spill=(g.SpillAllowance(rescuer="us", origin="mars", tokens=1.0),)), "spill[0].origin"),
    ]
    for signals, field in cases:
        with pytest.raises(g.SignalError) as err:
            r.snapshot(signals)
        assert err.value.field == field


REQUEST_CASES = [
    (dict(model="nope"), g.UnknownModel, "model", 404),
    (dict(model="m@v9"), g.UnknownVersion, "model", 404),
    (dict(version="v9"), g.UnknownVersion, "version", 404),
    (dict(origin="mars"), g.UnknownLocation, "origin", 400),
    (dict(priority="vip"), g.UnknownPriority, "priority", 400),
    (dict(prompt_tokens=-1), g.RequestError, "prompt_tokens", 400),
    (dict(prompt_tokens=1.5), g.RequestError, "prompt_tokens", 400),
    (dict(max_tokens=-1), g.RequestError, "max_tokens", 400),
    (dict(block_tokens=0), g.RequestError, "block_tokens", 400),
    (dict(waited_ms=math.nan), g.RequestError, "waited_ms", 400),
    (dict(waited_ms=-1.0), g.RequestError, "waited_ms", 400),
    (dict(prefix=(1, -2)), g.RequestError, "prefix", 400),
    (dict(prefix=(1, "x")), g.RequestError, "prefix", 400),
    (dict(prefix=(1 << 64,)), g.RequestError, "prefix", 400),
    (dict(prefix=np.zeros((2, 2), dtype=np.uint64)), g.RequestError, "prefix", 400),
    (dict(prefix=np.arange(1, (1 << 16) + 2, dtype=np.uint64)), g.RequestError, "prefix", 400),
    (dict(exclude=tuple(f"r{i}" for i in range(65))), g.RequestError, "exclude", 400),
    (dict(session=42), g.RequestError, "session", 400),
    (dict(session="bad\udc80surrogate"), g.RequestError, "session", 400),
]


@pytest.mark.parametrize("fields,kind,field,status", REQUEST_CASES, ids=[c[2] + "-" + str(i) for i, c in enumerate(REQUEST_CASES)])
def test_bad_requests_name_the_field(impl, fields, kind, field, status):
    r = g.Router(topology(), implementation=impl)
    s = snapshot(r)
    request = g.Request(**{"model": "m", "origin": "us", **fields})
    for call in (r.decide, r.route):
        with pytest.raises(kind) as err:
            call(request, s)
        assert err.value.field == field and err.value.http_status == status
    assert r.state.pending.sum() == 0 and r.state.clock[0] == 0  # nothing recorded


def test_errors_are_value_errors_with_a_readable_message():
    err = g.UnknownModel("model", "unknown model 'x'")
    assert isinstance(err, ValueError) and isinstance(err, g.GeoserveError)
    assert str(err) == "model: unknown model 'x'"


def test_unknown_excluded_ids_exclude_nothing(impl):
    r = g.Router(topology(), implementation=impl)
    d = r.decide(g.Request(model="m", origin="us", exclude=("gone-replica",)), snapshot(r))
    assert d.action == "serve"


def test_the_kernel_refuses_wrongly_typed_arrays():
    from geoserve import _compat

    if _compat.compiled_decide is None:
        pytest.fail("compiled kernels missing")
    r = g.Router(topology(), implementation="native")
    s = snapshot(r)
    with pytest.raises(TypeError):
        _compat.compiled_decide.decide(s, r.state, 0, -1, 0, 0, 10, 0, False, np.zeros(2, dtype=np.int64), 64, np.zeros(0, np.int32), 0.0)
    with pytest.raises(IndexError):
        _compat.compiled_decide.decide(s, r.state, 5, -1, 0, 0, 10, 0, False, np.zeros(0, np.uint64), 64, np.zeros(0, np.int32), 0.0)
