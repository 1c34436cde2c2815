"""imagine.service: valid for systemd, sandboxed to an exposure systemd rates OK, GPUs still reachable."""

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import imagine

ROOT = Path(imagine.__file__).resolve().parent
UNIT = ROOT / "imagine.service"

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def settings(unit_text: str, key: str) -> list:
    return re.findall(rf"^{key}=(.*)$", unit_text, flags=re.MULTILINE)


def test_the_service_runs_the_imagine_server_symlink_restarts_on_failure_and_logs_to_the_journal():
    text = UNIT.read_text()
    assert settings(text, "ExecStart") == ["/usr/bin/imagine-server"]
    assert settings(text, "Restart") == ["on-failure"]
    assert settings(text, "StandardOutput") == settings(text, "StandardError") == ["journal"]
    assert settings(text, "DynamicUser") == ["yes"]


def test_the_service_keeps_gpu_device_nodes_reachable():
    text = UNIT.read_text()
    assert not settings(text, "PrivateDevices")  # it would hide /dev/nvidia* and /dev/dri
    assert settings(text, "DevicePolicy") == ["closed"]
    assert {"char-nvidia* rw", "char-drm rw", "char-kfd rw"} <= set(settings(text, "DeviceAllow"))
    assert not settings(text, "MemoryDenyWriteExecute")  # PyTorch needs writable, executable memory


def test_every_environment_setting_is_one_imagine_reads():
    names = {line.split("=", 1)[0] for line in settings(UNIT.read_text(), "Environment")}
    known = {f"IMAGINE_{field.name.upper()}" for field in dataclasses.fields(imagine.Settings)}
    assert names - {"PATH", "HOME"} <= known


@needs_systemd
def test_systemd_analyze_verify_finds_nothing_to_complain_about(tmp_path):
    # verify insists that ExecStart exists; here it is the same symlink the install makes, in a scratch folder.
    server = tmp_path / "imagine-server"
    server.symlink_to(ROOT / "imagine.py")
    unit = tmp_path / "imagine.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/imagine-server", f"ExecStart={server}"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr + result.stdout


@needs_systemd
def test_systemd_analyze_security_rates_the_sandbox_ok():
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    exposure = re.search(r"Overall exposure level for imagine.service: ([\d.]+) (\w+)", result.stdout)
    assert exposure, result.stdout[-2000:]
    assert float(exposure[1]) < 5.0 and exposure[2] == "OK"


# Groups every stock install has: Debian's and Ubuntu's base-passwd and Fedora's setup package create them.
GROUPS_ON_EVERY_DISTRIBUTION = {"video", "audio", "disk", "tty", "users", "adm"}


def test_the_service_names_only_groups_that_exist_on_a_stock_debian_ubuntu_or_fedora():
    """systemd fails a unit whose SupplementaryGroups names a missing group (Debian has no `render`)."""
    groups = {group for line in settings(UNIT.read_text(), "SupplementaryGroups") for group in line.split()}
    assert groups <= GROUPS_ON_EVERY_DISTRIBUTION
    assert "video" in groups  # /dev/dri stays reachable


def test_the_api_key_goes_in_a_root_only_environment_file_never_in_an_environment_line():
    """`systemctl show` lets every user read Environment= lines; an EnvironmentFile's contents stay in the file."""
    text = UNIT.read_text()
    assert settings(text, "EnvironmentFile") == ["-/etc/imagine.env"]  # "-": the service starts without one
    assert "IMAGINE_API_KEY" not in " ".join(settings(text, "Environment"))
    assert not re.search(r"^#\s*Environment=IMAGINE_API_KEY", text, flags=re.MULTILINE)


SERVER_DOCS = (ROOT / "docs" / "server.md").read_text()
SERVICE_DOCS = SERVER_DOCS[SERVER_DOCS.index("## Running as a service") : SERVER_DOCS.index("## More than one GPU")]


def test_the_install_steps_copy_the_projects_own_files_and_give_the_cpu_only_build_its_own_step():
    blocks = re.findall(r"```sh\n(.*?)```", SERVICE_DOCS, re.S)
    assert "git archive --prefix=imagine/ HEAD | sudo tar -x -C /opt" in blocks[0]  # the copy at hand, no URL
    assert (
        blocks[1].strip()
        == "sudo /opt/imagine/.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu"
    )
    assert "github.com" not in SERVICE_DOCS


def test_the_systemctl_edit_example_puts_its_setting_under_a_service_line():
    [override] = re.findall(r"```ini\n(.*?)```", SERVICE_DOCS, re.S)
    assert override.splitlines()[0] == "[Service]"
    assert all(line.split("=", 1)[0] in {"Environment", "EnvironmentFile"} for line in override.splitlines()[1:])


def test_the_documented_key_file_is_the_one_the_unit_reads_and_is_made_readable_by_root_only():
    steps = [block for block in re.findall(r"```sh\n(.*?)```", SERVICE_DOCS, re.S) if "IMAGINE_API_KEY" in block]
    [step] = steps
    assert step.startswith("sudo install -m 600 /dev/null /etc/imagine.env\n")  # 600 before the key is written
    assert "| sudo tee /etc/imagine.env" in step
    assert settings(UNIT.read_text(), "EnvironmentFile") == ["-/etc/imagine.env"]
