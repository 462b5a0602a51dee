"""The ghz configs users load-test with (benchmarks/ghz/*.json): each names a real method of the
protoset, and its request, sent by grpcurl exactly as ghz would send it, succeeds on a live mesh."""

from __future__ import annotations

import json
import subprocess

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from tests.support.mesh import REPO, VENV_BIN

CONFIGS = sorted((REPO / "benchmarks" / "ghz").glob("*.json"))


def test_there_is_a_config_for_each_main_rpc():
    calls = {json.loads(path.read_text())["call"] for path in CONFIGS}
    assert calls == {
        "capibara.router.v1.RouterService.Route",
        "capibara.gateway.v1.ChatService.Chat",
        "capibara.inference.v1.InferenceService.Generate",
        "capibara.speech.v1.SpeechService.Synthesize",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_ghz_config_is_valid_and_its_request_succeeds(mesh, path):
    config = json.loads(path.read_text())
    protoset = REPO / config["protoset"]
    assert protoset.is_file(), "make protos writes it"
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(protoset.read_bytes()).file:
        pool.Add(file)
    service_name, method_name = config["call"].rsplit(".", 1)
    method = pool.FindServiceByName(service_name).methods_by_name[method_name]
    request_class = message_factory.GetMessageClass(method.input_type)
    json_format.ParseDict(config["data"], request_class())  # strict: unknown fields fail
    assert config["host"] == "localhost:5001" and config["cacert"] == ".state/tls/edge.crt"
    # Against the test mesh: its port and certificate instead of the defaults of `make run`.
    call = subprocess.run(
        [
            str(VENV_BIN / "grpcurl"),
            "-protoset",
            str(protoset),
            "-cacert",
            str(mesh.cert),
            "-servername",
            config["cname"],
            "-d",
            json.dumps(config["data"]),
            "-max-time",
            "120",
            mesh.edge,
            config["call"].rsplit(".", 1)[0] + "/" + method_name,
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert call.returncode == 0, call.stderr
    assert call.stdout.strip()
