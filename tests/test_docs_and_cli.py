"""docs/api.md's example fleet is loaded from the doc itself, so the two cannot drift."""

import json
import re
import subprocess
import sys
from pathlib import Path

import geoserve as g
from geoserve.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"


def api_example(tmp_path) -> Path:
    text = (DOCS / "api.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/api.md should hold exactly one TOML example"
    path = tmp_path / "fleet.toml"
    path.write_text(blocks[0])
    return path


def test_the_api_doc_example_loads_and_routes_as_described(tmp_path, impl):
    topology = g.Topology.from_file(api_example(tmp_path))
    r = g.Router(topology, implementation=impl)
    s = r.snapshot(g.Signals(now_ms=0.0, replicas=tuple(g.ReplicaSignal(replica=x, observed_ms=0.0) for x in r.fleet.replica_ids)))
    d = r.decide(g.Request(model="chat", origin="sydney-pop", prompt_tokens=500), s)
    # sydney's home is ap-northeast, which only runs the v8 canary: chat (pinned v7) spills to the US
    assert (d.action, d.region, d.version, d.network_ms) == ("overflow", "us-east", "v7", 200.0)
    canary = r.decide(g.Request(model="llama-70b", origin="sydney-pop", version="v8", prompt_tokens=500), s)
    assert (canary.action, canary.replica, canary.endpoint) == ("serve", "apn-70b-0", "10.2.0.10:8000")
    assert topology.priority_classes()["batch"].slot_ceiling == 0.75
    assert topology.priority_classes()["interactive"].local_budget_ms == 800.0


def test_cli_check_prints_the_fleet_and_names_bad_fields(tmp_path, capsys):
    path = api_example(tmp_path)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 regions, 1 edges, 2 models, 5 replicas" in out and "ap-northeast: llama-70b x1, llama-8b x1" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace('region = "eu-west"', 'region = "eu-wset"'))
    assert main(["check", str(bad)]) == 2
    assert "deployments[1].region" in capsys.readouterr().err


def test_cli_decide_prints_a_decision_as_json(tmp_path):
    path = api_example(tmp_path)
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"model": "chat", "origin": "eu-west", "prompt_tokens": 100, "session": "u1"}))
    out = subprocess.run(
        [sys.executable, "-m", "geoserve", "decide", str(path), "--request", str(request)],
        capture_output=True, text=True, check=True,
    )
    decision = json.loads(out.stdout)
    assert (decision["action"], decision["replica"], decision["reason"]) == ("serve", "euw-70b-0", "affinity")
    request.write_text(json.dumps({"model": "gpt-9", "origin": "eu-west"}))
    out = subprocess.run([sys.executable, "-m", "geoserve", "decide", str(path), "--request", str(request)], capture_output=True, text=True)
    assert out.returncode == 2 and "UnknownModel" in out.stderr and "model:" in out.stderr


def test_the_readme_example_runs(capsys):
    text = (DOCS.parent / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out[0] == "serve" and out[1] == "ap-northeast" and out[-1] == "affinity"
