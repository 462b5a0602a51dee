"""edge.tls_cert / edge.tls_key: a missing file is a configuration error naming the file and line,
like a missing model file, never a traceback from the command that reads it."""

from __future__ import annotations

import pytest

from capibara_grpc import cli
from capibara_grpc.config import ConfigError, parse_config
from capibara_grpc.edge.tls import ensure_certificate

# No launched model, no router, no speech: no file but the certificate's is checked.
MESH = """\
models:
  phi:
    backend: {url: "http://127.0.0.1:9"}
gateway: {default_model: phi}
router: {enabled: false}
speech: {enabled: false}
edge:
  port: 5001
  tls_cert: CERT
  tls_key: KEY
"""


def mesh(cert: str, key: str) -> str:
    return MESH.replace("CERT", cert).replace("KEY", key)


def test_a_missing_certificate_names_its_line():
    with pytest.raises(ConfigError) as error:
        parse_config(mesh("/nope.crt", "/nope.key"), source="mesh.yaml")
    assert str(error.value) == "mesh.yaml:9: edge.tls_cert: file '/nope.crt' not found"


def test_a_missing_key_names_its_line(tmp_path):
    cert = tmp_path / "edge.crt"
    cert.write_text("not checked here")
    with pytest.raises(ConfigError) as error:
        parse_config(mesh(str(cert), "tls/edge.key"), source="mesh.yaml", base_dir=tmp_path)
    # A relative path is relative to base_dir; the message says both.
    assert str(error.value) == f"mesh.yaml:10: edge.tls_key: file 'tls/edge.key' not found ({tmp_path}/tls/edge.key)"


def test_one_service_alone_does_not_need_the_edge_certificate():
    # `capibara serve router` (a Kubernetes pod, say) never opens the edge's certificate.
    config = parse_config(mesh("/nope.crt", "/nope.key"), check_files={"router"})
    assert config.edge.tls_cert == "/nope.crt"


def test_a_certificate_without_its_key_is_refused_even_without_file_checks():
    text = MESH.replace("  tls_key: KEY\n", "").replace("CERT", "/nope.crt")
    with pytest.raises(ConfigError, match=r"^mesh.yaml:9: edge.tls_cert is set but edge.tls_key is not"):
        parse_config(text, source="mesh.yaml", check_files=False)


def test_a_certificate_removed_after_loading_is_still_a_configuration_error(tmp_path):
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    cert.write_text("x")
    key.write_text("x")
    config = parse_config(mesh(str(cert), str(key)), source="mesh.yaml")
    assert ensure_certificate(config) == (cert, key)
    key.unlink()
    with pytest.raises(ConfigError, match=rf"^mesh.yaml:10: edge.tls_key: file '{key}' not found$"):
        ensure_certificate(config)


@pytest.mark.parametrize("command", [["envoy-config"], ["chat", "hola"], ["mcp"]])
def test_the_commands_that_read_it_say_so_and_exit_2(tmp_path, capsys, command):
    path = tmp_path / "config" / "mesh.yaml"
    path.parent.mkdir()
    path.write_text(mesh("/nope.crt", "/nope.key"))
    assert cli.main(["--config", str(path), *command]) == 2
    err = capsys.readouterr().err
    assert err == f"configuration error: {path}:9: edge.tls_cert: file '/nope.crt' not found\n"


def test_commands_that_never_open_the_certificate_do_not_need_it(tmp_path, capsys):
    # `capibara k8s` writes manifests that mount the certificate from a Secret on the cluster.
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("/nope.crt", "/nope.key"))
    assert cli.main(["--config", str(path), "k8s", "--out", str(tmp_path / "k8s")]) == 0
    assert cli.main(["--config", str(path), "envoy-config"]) == 2
    assert "edge.tls_cert: file '/nope.crt' not found" in capsys.readouterr().err
