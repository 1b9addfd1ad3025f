"""INDI Web Manager (indiweb, PyPI) lists the thermostat from its --driver-xml.

indiweb lists the drivers it finds in the driver XML files of its --xmldir
(default /usr/share/indi): indiweb.driver.DriverCollection parses every
*.xml there whose name has no "_sk", each devGroup's group as the family,
each device's label, its driver's name and text (the executable), and its
version. These tests feed `thermostat.py --driver-xml` to that parser, and to
indiweb's /api/drivers and the FIFO line it would send indiserver, all in a
temporary folder: no network, no indiserver, nothing under /usr/share/indi.
Skipped where indiweb is not installed (it is in the test extra).
"""

import subprocess
import sys
from pathlib import Path

import indiweb.driver as driver  # noqa: E402
import pytest

import thermostat

LIBINDI_DRIVERS_XML = Path("/usr/share/indi/drivers.xml")     # libindi's own list, where installed


def driver_xml():
    "What `python thermostat.py --driver-xml` prints, run as a user would run it."
    result = subprocess.run([sys.executable, thermostat.__file__, "--driver-xml"],
                            capture_output=True, text=True, timeout=30, check=True)
    return result.stdout


@pytest.fixture
def xmldir(tmp_path):
    "An indiweb --xmldir holding the thermostat's driver XML as the README installs it."
    folder = tmp_path / "indi"
    folder.mkdir()
    (folder / "indi_thermostat.xml").write_text(driver_xml())
    return folder


def test_indiweb_parser_lists_the_thermostat(xmldir):
    collection = driver.DriverCollection(str(xmldir))
    assert [d.label for d in collection.drivers] == ["Thermostat"]
    found = collection.by_label("Thermostat")
    assert found.name == "Thermostat"
    assert found.binary == "indi_thermostat"
    assert found.family == "Auxiliary"
    assert found.version == thermostat.__version__
    assert found.skeleton is None and found.mdpd is False and found.custom is False
    assert collection.get_families() == {"Auxiliary": ["Thermostat"]}
    assert collection.by_binary("indi_thermostat") is found


def test_beside_libindis_drivers_the_label_is_unique(xmldir):
    (xmldir / "drivers.xml").write_bytes(LIBINDI_DRIVERS_XML.read_bytes())
    collection = driver.DriverCollection(str(xmldir))
    ours = [d for d in collection.drivers if d.binary == "indi_thermostat"]
    assert len(ours) == 1 and len(collection.drivers) > 1
    # profiles hold labels: by_label (exact first, then prefix) must find ours
    assert [d.label for d in collection.drivers].count("Thermostat") == 1
    assert collection.by_label("Thermostat") is ours[0]
    assert "Thermostat" in collection.get_families()["Auxiliary"]


def test_the_fifo_line_indiweb_sends_indiserver(xmldir, tmp_path):
    """Starting a profile, indiweb writes `start BINARY -n "LABEL"` to
    indiserver's FIFO; indiserver then runs indi_thermostat with INDIDEV set
    to the label, which the thermostat takes as its device name."""
    import indiweb.indi_server as indi_server
    fifo = tmp_path / "fifo"                    # a plain file: nothing reads it
    server = indi_server.IndiServer(fifo=str(fifo), conf_dir=str(tmp_path))
    server.start_driver(driver.DriverCollection(str(xmldir)).by_label("Thermostat"))
    assert fifo.read_text() == 'start indi_thermostat -n "Thermostat"\n'
    assert list(server.get_running_drivers()) == ["Thermostat"]


def test_api_drivers_lists_the_thermostat(xmldir, tmp_path):
    "indiweb's own /api/drivers, in process (no port is opened)."
    import indiweb.main as main
    from fastapi import testclient  # starlette's needs httpx2, in the test extra
    app = main.create_app(["--xmldir", str(xmldir), "--conf", str(tmp_path / "conf"),
                           "--fifo", str(tmp_path / "fifo")])
    client = testclient.TestClient(app)
    listed = [d for d in client.get("/api/drivers").json() if d["binary"] == "indi_thermostat"]
    assert listed == [{"name": "Thermostat", "label": "Thermostat", "skeleton": None,
                       "version": thermostat.__version__, "binary": "indi_thermostat",
                       "family": "Auxiliary", "mdpd": False, "custom": False, "rule": None,
                       "role": ""}]
    assert "Auxiliary" in client.get("/api/drivers/groups").json()
