"""Supervision by `capibara up`: the restart policy (pure, no processes), death messages, and a real
mesh whose llama-servers die: a killed one serves again within seconds, one that cannot start is
given up on while the rest of the mesh keeps serving, and Ctrl-C during a restart delay stops
everything."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest
import yaml

from capibara_grpc.config import ConfigError, SupervisionConfig, parse_config
from capibara_grpc.supervision.priority import autogroup_enabled, autogroup_nice, thread_nice
from capibara_grpc.supervision.process_exit import describe_exit
from capibara_grpc.supervision.supervisor import GIVE_UP, LEAVE, RESTART, RestartTracker, backoff_delays
from tests.support.mesh import REPO, VENV_BIN, launched_model, mesh_config, processes_using, running_mesh, stop_mesh

# ---------------------------------------------------------------------------------------------
# The policy: no processes, no clock.


def deaths(tracker: RestartTracker, count: int, uptime_s: float = 1.0, returncode: int = -9):
    return [tracker.on_exit(returncode, uptime_s) for _ in range(count)]


def test_backoff_doubles_up_to_the_cap():
    policy = SupervisionConfig(backoff_initial_s=0.5, backoff_max_s=30.0, give_up_after=0)
    assert backoff_delays(policy, 9) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    # The tracker follows it: a process that keeps dying waits longer each time, never longer than the cap.
    decisions = deaths(RestartTracker(policy), 9)
    assert [d.action for d in decisions] == [RESTART] * 9
    assert [d.delay_s for d in decisions] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert [d.attempt for d in decisions] == list(range(1, 10))


def test_gives_up_after_n_quick_failures_in_a_row():
    tracker = RestartTracker(SupervisionConfig(give_up_after=5, stable_after_s=30))
    decisions = deaths(tracker, 5, uptime_s=0.3, returncode=1)
    assert [d.action for d in decisions] == [RESTART] * 4 + [GIVE_UP]
    assert [d.delay_s for d in decisions[:4]] == [0.5, 1, 2, 4]
    assert decisions[-1].quick_failures == 5 and tracker.given_up
    assert "5 starts in a row each died within 30 s of starting" in decisions[-1].reason


def test_a_stable_run_resets_the_delay_and_the_count():
    tracker = RestartTracker(SupervisionConfig(give_up_after=3, stable_after_s=30))
    assert [d.action for d in deaths(tracker, 2, uptime_s=5)] == [RESTART, RESTART]
    # Up for longer than stable_after_s: this death starts over, from the first delay.
    after_stable = tracker.on_exit(-9, uptime_s=31)
    assert (after_stable.action, after_stable.delay_s, after_stable.attempt, after_stable.quick_failures) == (
        RESTART,
        0.5,
        1,
        0,
    )
    # So two more quick deaths are not yet the third in a row; a third is.
    assert [d.action for d in deaths(tracker, 3, uptime_s=5)] == [RESTART, RESTART, GIVE_UP]


def test_slow_deaths_never_give_up():
    tracker = RestartTracker(SupervisionConfig(give_up_after=2, stable_after_s=30))
    assert {d.action for d in deaths(tracker, 10, uptime_s=60)} == {RESTART}
    assert {d.delay_s for d in deaths(tracker, 3, uptime_s=60)} == {0.5}


def test_give_up_after_zero_never_gives_up():
    tracker = RestartTracker(SupervisionConfig(give_up_after=0, backoff_max_s=2))
    decisions = deaths(tracker, 50, uptime_s=0.1)
    assert {d.action for d in decisions} == {RESTART} and decisions[-1].delay_s == 2


@pytest.mark.parametrize(
    "restart, returncode, action",
    [
        ("on-failure", -9, RESTART),
        ("on-failure", 1, RESTART),
        ("on-failure", 0, LEAVE),
        ("always", 0, RESTART),
        ("no", -9, LEAVE),
        ("no", 1, LEAVE),
    ],
)
def test_which_exits_are_restarted(restart, returncode, action):
    decision = RestartTracker(SupervisionConfig(restart=restart)).on_exit(returncode, 100)
    assert decision.action == action
    if action == LEAVE:
        assert decision.reason


def test_describe_exit_names_the_signal_and_what_it_means():
    assert describe_exit(-4).startswith("killed by SIGILL (illegal instruction:")
    assert "CPU" in describe_exit(-4) and "make rebuild-llama-server" in describe_exit(-4)
    assert describe_exit(-9).startswith("killed by SIGKILL (killed outright:")
    assert "out-of-memory" in describe_exit(-9) and "kill -9" in describe_exit(-9)
    assert describe_exit(-11).startswith("killed by SIGSEGV (segmentation fault:")
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(132).startswith("exited with status 132 (128 + SIGILL:")


# ---------------------------------------------------------------------------------------------
# The configuration section.

CONFIG = """\
models:
  phi:
    backend: {url: "http://127.0.0.1:8081", protocol: llama_cpp}
gateway:
  default_model: phi
router:
  enabled: false
"""


def test_supervision_defaults_and_settings():
    config = parse_config(CONFIG, check_files=False)
    assert config.supervision == SupervisionConfig("on-failure", 0.5, 30.0, 5, 30.0, mesh_nice=5)
    # `no` unquoted is a YAML boolean; the setting still reads it as the word.
    config = parse_config(
        CONFIG + "supervision: {restart: no, backoff_initial_s: 1, give_up_after: 0}\n", check_files=False
    )
    assert (config.supervision.restart, config.supervision.backoff_initial_s, config.supervision.give_up_after) == (
        "no",
        1.0,
        0,
    )


@pytest.mark.parametrize(
    "section, line, message",
    [
        ("restart: sometimes", 10, "supervision.restart 'sometimes' must be one of on-failure, always, no"),
        ("backoff_initial_s: 0", 10, "supervision.backoff_initial_s must be a positive number of seconds"),
        ("backoff_initial_s: 5\n  backoff_max_s: 1", 11, "supervision.backoff_max_s (1) must not be below"),
        ("give_up_after: -1", 10, "supervision.give_up_after must be 0 (never give up) or more"),
        ("stable_after_s: -3", 10, "supervision.stable_after_s must be a positive number"),
        ("mesh_nice: 20", 10, "supervision.mesh_nice must be a whole number from 0 to 19"),
        ("mesh_nice: -1", 10, "supervision.mesh_nice must be a whole number from 0 to 19"),
        ("restrat: no", 10, "unknown key 'restrat' in supervision"),
        ("backoff_max_s: soon", 10, "supervision.backoff_max_s must be a number"),
    ],
)
def test_bad_supervision_settings_name_the_line(section, line, message):
    with pytest.raises(ConfigError) as error:
        parse_config(CONFIG + f"\nsupervision:\n  {section}\n", source="mesh.yaml", check_files=False)
    assert message in str(error.value)
    assert str(error.value).startswith(f"mesh.yaml:{line}:"), error.value


def test_the_shipped_config_documents_the_defaults():
    from capibara_grpc.config import DEFAULT_CONFIG_PATH

    documented = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())["supervision"]
    assert SupervisionConfig(**documented) == SupervisionConfig()


# ---------------------------------------------------------------------------------------------
# Real processes.


def test_ctrl_c_while_starting_during_a_restart_delay_stops_at_once(tmp_path):
    """A model that died at once waits 60 s for its restart; Ctrl-C then does not wait for it."""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model" * 100)
    broken = launched_model(21281)
    broken["launch"]["model_path"] = str(garbage)
    config = {
        **mesh_config(tmp_path / "state", 21200, {"sturdy": launched_model(21280), "broken": broken}, router=False),
        "supervision": {"backoff_initial_s": 60, "backoff_max_s": 60},
    }
    config_path = tmp_path / "capibara.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [str(VENV_BIN / "capibara"), "--config", str(config_path), "up"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "restarting it in 60 s" not in log_path.read_text() and time.monotonic() < deadline:
            assert up.poll() is None, log_path.read_text()
            time.sleep(0.05)
        assert "llama-server-broken (pid " in log_path.read_text(), log_path.read_text()
        started = time.monotonic()
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert time.monotonic() - started < 5
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    assert "restarted llama-server-broken" not in log_path.read_text()
    for marker in (str(config_path), "--port 21280", "--port 21281"):
        assert processes_using(marker) == [], f"{marker}: left behind"


# A mesh: `sturdy` is killed, `broken` never starts (its "model" is not a GGUF file).

BASE = 21000
STURDY_PORT, BROKEN_PORT = BASE + 80, BASE + 81
# The default first delay (0.5 s), so the kill test measures what a user gets; a low cap and
# give-up count so the broken model is given up on in seconds.
SUPERVISION = {"backoff_initial_s": 0.5, "backoff_max_s": 2, "give_up_after": 3, "stable_after_s": 30}


@pytest.fixture(scope="module")
def supervised_mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("supervised")
    garbage = directory / "garbage.gguf"
    garbage.write_bytes(b"this is not a GGUF file\n" * 4096)
    broken = launched_model(BROKEN_PORT)
    broken["launch"]["model_path"] = str(garbage)
    models = {"sturdy": launched_model(STURDY_PORT), "broken": broken}
    with running_mesh(directory, BASE, models, router=False, supervision=SUPERVISION) as mesh:
        yield mesh


def llama_server_pids(port: int) -> list[int]:
    return [int(p.split(":", 1)[0]) for p in processes_using(f"--port {port}") if "llama-server" in p]


def chat(mesh, model: str) -> tuple[int, dict]:
    status, body, _ = mesh.request(
        "POST", "/api/chat", {"message": "hola", "model": model, "max_tokens": 3}, timeout=30
    )
    return status, body


def test_a_model_that_never_starts_is_given_up_and_the_rest_keeps_serving(supervised_mesh):
    output = supervised_mesh.output()
    log_path = f"{supervised_mesh.config['state_dir']}/logs/llama-server-broken.log"
    (give_up,) = [line for line in output.splitlines() if "giving up on llama-server-broken" in line]
    assert "after 3 attempts (3 starts in a row each died within 30 s of starting)" in give_up, give_up
    assert "last: exited with status 1" in give_up and f"log: {log_path}" in give_up, give_up
    assert "model broken stays down; the rest of the mesh keeps serving" in give_up
    # Each death before it was described and followed by a restart after the backoff delay.
    deaths = [line for line in output.splitlines() if line.startswith("capibara up: llama-server-broken (pid ")]
    assert len(deaths) == 2 and output.count("restarted llama-server-broken") == 2, deaths
    assert all(" exited with status 1 after " in line for line in deaths), deaths
    assert "restarting it in 0.5 s (restart 1; 1 of 3 quick deaths" in deaths[0], deaths
    assert "restarting it in 1 s (restart 2; 2 of 3 quick deaths" in deaths[1], deaths
    # The log's last lines come with the message: llama.cpp says why it could not load the model.
    assert "    | " in output.split("giving up on llama-server-broken", 1)[1]
    assert "without: llama-server-broken" in output
    assert llama_server_pids(BROKEN_PORT) == []
    assert chat(supervised_mesh, "sturdy")[0] == 200
    status, error = chat(supervised_mesh, "broken")
    assert status == 503 and "broken" in error["message"], error


def envoy_pid(mesh) -> int:
    state_dir = mesh.config["state_dir"]
    (line,) = [p for p in processes_using(f"{state_dir}/envoy") if "envoy" in p.split()[1]]
    return int(line.split(":", 1)[0])


def test_model_servers_run_ahead_of_the_mesh(supervised_mesh):
    """supervision.mesh_nice (5 by default): Envoy and capibara up's own threads (the services) are
    5 levels nicer than the llama-server, which keeps the priority capibara up was started with;
    one thread of capibara up (the one that starts children) keeps it too."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # capibara up inherited the test's
    mesh = min(19, base + 5)  # nice values stop at 19
    (server,) = llama_server_pids(STURDY_PORT)
    assert thread_nice(server) == base
    assert thread_nice(envoy_pid(supervised_mesh)) == mesh
    up = supervised_mesh.process.pid
    threads = []
    for tid in os.listdir(f"/proc/{up}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            threads.append(thread_nice(f"{up}/task/{tid}"))
    assert threads.count(base) == 1 and threads.count(mesh) == len(threads) - 1, threads
    if autogroup_enabled():  # each child leads its own session, so it is its own scheduling group
        assert autogroup_nice(server) == 0
        assert autogroup_nice(envoy_pid(supervised_mesh)) == 5
        assert autogroup_nice(up) == 5  # capibara up leads its own session here (the test started it so)


def test_a_killed_llama_server_serves_again_within_10_s(supervised_mesh):
    assert chat(supervised_mesh, "sturdy")[0] == 200
    (old_pid,) = llama_server_pids(STURDY_PORT)
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        status, body = chat(supervised_mesh, "sturdy")
        if status == 200 or time.monotonic() - killed_at > 10:
            break
        time.sleep(0.1)
    back_after = time.monotonic() - killed_at
    assert status == 200, body
    print(f"sturdy answered again {back_after:.1f} s after SIGKILL")
    assert back_after < 10
    (new_pid,) = llama_server_pids(STURDY_PORT)
    assert new_pid != old_pid
    # Started again by capibara up's spawner thread: at the model servers' priority, not the mesh's.
    assert thread_nice(new_pid) == os.getpriority(os.PRIO_PROCESS, 0)
    output = supervised_mesh.output()
    (death,) = [line for line in output.splitlines() if f"llama-server-sturdy (pid {old_pid})" in line]
    assert "killed by SIGKILL (killed outright: by the kernel's out-of-memory killer" in death, death
    assert "restarting it in 0.5 s (restart 1" in death
    assert f"log: {supervised_mesh.config['state_dir']}/logs/llama-server-sturdy.log" in death
    assert f"restarted llama-server-sturdy (pid {new_pid}, restart 1)" in output
    # The same log file, appended to, says where the restart began.
    server_log = supervised_mesh.config["state_dir"] + "/logs/llama-server-sturdy.log"
    text = open(server_log, errors="replace").read()
    assert "capibara up" in text and "restart 1, after the previous run killed by SIGKILL" in text


def test_a_killed_envoy_is_restarted_and_the_edge_answers_again(supervised_mesh):
    state_dir = supervised_mesh.config["state_dir"]
    old_pid = envoy_pid(supervised_mesh)
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    output = supervised_mesh.wait_for_output("restarted envoy (pid ", timeout_s=10)
    (death,) = [line for line in output.splitlines() if f"envoy (pid {old_pid}) killed by SIGKILL" in line]
    assert "restarting it in 0.5 s (restart 1" in death and f"log: {state_dir}/logs/envoy.log" in death, death
    while True:
        try:
            status, body = chat(supervised_mesh, "sturdy")
        except OSError as exc:  # the edge is not listening yet
            status, body = 0, str(exc)
        if status == 200 or time.monotonic() - killed_at > 10:
            break
        time.sleep(0.1)
    assert status == 200, body
    print(f"the edge answered again {time.monotonic() - killed_at:.1f} s after Envoy's SIGKILL")
    assert supervised_mesh.process.poll() is None  # capibara up is still running
    # Started again as nice as the first time: the restart keeps the mesh behind the model servers.
    assert thread_nice(envoy_pid(supervised_mesh)) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)


# Last: it stops the module's mesh.
def test_ctrl_c_during_a_restart_delay_stops_everything(supervised_mesh):
    (pid,) = llama_server_pids(STURDY_PORT)
    os.kill(pid, signal.SIGKILL)
    supervised_mesh.wait_for_output(f"llama-server-sturdy (pid {pid}) killed by SIGKILL", timeout_s=5)
    started = time.monotonic()
    assert stop_mesh(supervised_mesh) == 0
    assert time.monotonic() - started < 10
    output = supervised_mesh.output()
    # It was stopped during the delay: no second restart happened.
    assert output.count("restarted llama-server-sturdy") == 1, output[-3000:]
    assert "stopped." in output
    for marker in (str(supervised_mesh.config_path), supervised_mesh.config["state_dir"], f"--port {STURDY_PORT}"):
        assert processes_using(marker) == [], f"{marker}: left behind"
