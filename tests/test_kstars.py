"""At home in KStars and Ekos: messages in libindi's form, settings kept in
libindi's configuration file through CONFIG_PROCESS, DEBUG at run time."""

import asyncio
import logging
import os
import re
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import thermostat
from conftest import (
    FAST,
    ROOT,
    ServerProcess,
    free_port,
    new_number,
    new_switch,
    tagged,
    wait_until,
)

GET_ALL = '<getProperties version="1.7"/>'
WHOLE_SECOND = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def shown_by_kstars(element):
    """KStars keeps a device message as "<timestamp>: <text>" and shows it
    only if the text from character 21 starts with [I, [W or [E."""
    kept = f"{element.get('timestamp')}: {element.get('message')}"
    return WHOLE_SECOND.fullmatch(element.get("timestamp")) is not None and kept[21:23] in ("[I", "[W", "[E")


def reply_to(client, vector):
    return client.expect(lambda e: e.tag.startswith("set") and e.get("name") == vector, what=f"{vector} reply")


def definitions(client, *names):
    "The definitions of the named vectors, in whatever order they come."
    found = {}
    while len(found) < len(names):
        element = client.expect(lambda e: e.tag.startswith("def") and e.get("name") in names,
                                what=f"definitions of {names}")
        found[element.get("name")] = element
    return [found[name] for name in names]


def sent_before(client, reply, vector):
    "The last update of vector received before reply."
    earlier = client.received[:client.received.index(reply)]
    return [e for e in earlier if e.tag.startswith("set") and e.get("name") == vector][-1]


def member(element, name):
    return next(one.text.strip() for one in element if one.get("name") == name)


def config_action(client, action):
    client.send(new_switch("Thermostat", "CONFIG_PROCESS", action, "On"))
    return reply_to(client, "CONFIG_PROCESS")


def saved(path):
    "{(vector, member): value} as saved for Thermostat in a configuration file."
    return {(vector.get("name"), one.get("name")): (one.text or "").strip()
            for vector in ET.parse(path).getroot() if vector.get("device") == "Thermostat" for one in vector}


def write_config(path, *requests):
    path.write_text("<INDIDriver>\n" + "\n".join(requests) + "\n</INDIDriver>\n")


def saved_target(path):
    try:
        return saved(path).get(("targetvector", "target"))
    except (OSError, ET.ParseError):
        return None


@pytest.fixture
def started():
    servers = []

    def start(*options):
        servers.append(ServerProcess(*options))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()


# -- messages ---------------------------------------------------------------

def test_every_message_is_in_the_form_kstars_shows(started):
    server = started(*FAST)
    client = server.client()
    client.send(GET_ALL)
    client.send(new_number("Thermostat", "targetvector", "target", "NaN"))
    rejection = reply_to(client, "targetvector")
    client.send(new_number("Thermostat", "temperaturevector", "temperature", "40"))
    refusal = client.expect(tagged("message", device="Thermostat"))
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "On"))
    information = client.expect(tagged("message", device="Thermostat"))
    for element in (rejection, refusal, information):
        assert shown_by_kstars(element), ET.tostring(element)
    assert rejection.get("message").startswith("[WARNING] target must be a number")
    assert refusal.get("message").startswith("[WARNING] temperaturevector: ")
    assert information.get("message") == "[INFO] Log reporting is now On"
    # readings keep their exact time: only what carries a message is cut to the second
    reading = client.expect(tagged("setNumberVector", name="temperaturevector"))
    assert "." in reading.get("timestamp")
    client.close()


def test_the_send_hook_forms_every_message_and_keeps_a_given_level():
    driver = thermostat.make_driver(config=None)
    sent = []

    class Recorder:
        async def run_tx(self, xmldata):
            sent.append(xmldata)
    driver._commsobj = Recorder()

    async def speak():
        await driver.device.send_device_message(message="plain news")
        await driver.device.send_device_message(message="[ERROR] the sensor is gone")
        await driver.device.send_device_message(message="[WARNING] too warm")
        await driver.reject(driver.device["targetvector"], "no")
        await driver.device["temperaturevector"].send_setVector(message="")
    asyncio.run(speak())
    assert [e.get("message") for e in sent] == [
        "[INFO] plain news", "[ERROR] the sensor is gone", "[WARNING] too warm", "[WARNING] no", None]
    assert all(shown_by_kstars(e) for e in sent[:4])


# -- CONFIG_PROCESS ---------------------------------------------------------

def test_config_process_and_debug_are_defined_as_libindi_defines_them(started):
    client = started(*FAST).client()
    client.send(GET_ALL)
    config, debug = definitions(client, "CONFIG_PROCESS", "DEBUG")
    assert (config.get("group"), config.get("rule"), config.get("perm")) == ("Options", "AtMostOne", "rw")
    assert [(one.get("name"), one.text.strip()) for one in config] == [
        ("CONFIG_LOAD", "Off"), ("CONFIG_SAVE", "Off"), ("CONFIG_DEFAULT", "Off"), ("CONFIG_PURGE", "Off")]
    assert (debug.get("group"), debug.get("rule"), debug.get("perm")) == ("Options", "OneOfMany", "rw")
    assert [(one.get("name"), one.text.strip()) for one in debug] == [("ENABLE", "Off"), ("DISABLE", "On")]
    client.close()


def test_every_accepted_change_is_saved_at_once_in_libindis_format(started, indi_config):
    client = started(*FAST).client()
    client.send(GET_ALL)
    client.send(new_number("Thermostat", "targetvector", "target", "21.5"))
    assert reply_to(client, "targetvector").get("state") in ("Ok", "Busy")
    wait_until(lambda: saved_target(indi_config) == "21.50", timeout=5.0, what="the target saved")
    client.send(new_number("Thermostat", "targetvector", "target", "500"))     # refused: not saved
    assert reply_to(client, "targetvector").get("state") == "Alert"
    indi_config.unlink()
    reply = config_action(client, "CONFIG_SAVE")
    assert reply.get("state") == "Ok" and shown_by_kstars(reply)
    assert all(one.text.strip() == "Off" for one in reply)
    root = ET.parse(indi_config).getroot()
    assert root.tag == "INDIDriver"
    assert [(e.tag, e.get("device"), e.get("name")) for e in root] == [
        ("newNumberVector", "Thermostat", "targetvector"), ("newNumberVector", "Thermostat", "POLLING_PERIOD"),
        ("newNumberVector", "Thermostat", "logperiodvector"), ("newNumberVector", "Thermostat", "limitsvector"),
        ("newSwitchVector", "Thermostat", "DEBUG"),
        # and the regulation's settings (issue 20), the weather station snooped for the dew point
        ("newSwitchVector", "Thermostat", "CONTROL_MODE"),
        ("newNumberVector", "Thermostat", "REGULATION_SETTINGS"),
        ("newNumberVector", "Thermostat", "PID_SETTINGS"), ("newNumberVector", "Thermostat", "CONTROL_CYCLE"),
        ("newNumberVector", "Thermostat", "TARGET_RAMP"), ("newTextVector", "Thermostat", "ACTIVE_DEVICES")]
    assert saved(indi_config)[("targetvector", "target")] == "21.50"
    assert not list(indi_config.parent.glob("*.part")) and not (indi_config.parent / ".indi").exists()
    client.close()


def test_a_restarted_thermostat_comes_back_with_its_target_and_poll_period(started, indi_config):
    first = started()                                   # default 10 s polls, target 15
    client = first.client()
    client.send(GET_ALL)
    client.send(new_number("Thermostat", "targetvector", "target", "23"))
    reply_to(client, "targetvector")
    client.send(new_number("Thermostat", "POLLING_PERIOD", "PERIOD_MS", "50"))
    reply_to(client, "POLLING_PERIOD")
    client.close()
    assert first.stop() == 0

    client = started().client()
    client.send(GET_ALL)
    target, period = definitions(client, "targetvector", "POLLING_PERIOD")
    assert (member(target, "target"), member(period, "PERIOD_MS")) == ("23.00", "50")
    client.gather(tagged("setNumberVector", name="temperaturevector"), 10, timeout=5)   # 10 s polls would not
    client.close()


def test_a_client_at_start_waits_for_the_saved_settings_and_its_change_is_not_undone(in_process, tmp_path):
    config = tmp_path / "config.xml"
    config.write_text(f"<INDIDriver>{new_number('Thermostat', 'targetvector', 'target', '30')}</INDIDriver>")
    driver = thermostat.make_driver(poll_interval=0.05, config=config)
    disk_answers = threading.Event()
    read = driver.settings.read

    def slow_read():  # a slow disk, which the test releases
        if not disk_answers.wait(5):
            raise TimeoutError("the test never released the disk")
        return read()
    driver.settings.read = slow_read
    running = in_process(thermostat.make_server(driver, port=free_port()))
    asker, changer = running.client(), running.client()
    asker.send(GET_ALL)
    changer.send(new_number("Thermostat", "targetvector", "target", "40"))
    with pytest.raises(AssertionError, match="timed out"):   # nothing is answered while the disk is slow
        asker.expect(tagged("defNumberVector", name="targetvector"), timeout=0.3)
    disk_answers.set()
    (target,) = definitions(asker, "targetvector")
    assert member(target, "target") in ("30.00", "40.00")  # the saved value or the change, never 15
    assert member(reply_to(changer, "targetvector"), "target") == "40.00"
    asker.send(GET_ALL)
    (target,) = definitions(asker, "targetvector")
    assert member(target, "target") == "40.00"           # the load did not undo the change


def test_safety_limits_are_saved_and_the_command_line_wins_over_them(started, indi_config):
    first = started()
    client = first.client()
    client.send(GET_ALL)
    client.send('<newNumberVector device="Thermostat" name="limitsvector"><oneNumber name="maxtemperature">'
                '30</oneNumber><oneNumber name="maxheateron">120</oneNumber></newNumberVector>')
    assert reply_to(client, "limitsvector").get("state") == "Ok"
    wait_until(lambda: indi_config.exists() and saved(indi_config).get(("limitsvector", "maxheateron")) == "120",
               timeout=5.0, what="the limits saved")
    client.close()
    assert first.stop() == 0

    client = started().client()
    client.send(GET_ALL)
    limits, = definitions(client, "limitsvector")
    assert (member(limits, "maxtemperature"), member(limits, "maxheateron")) == ("30.00", "120")
    client.close()

    client = started("--max-temperature", "40").client()
    client.send(GET_ALL)
    limits, = definitions(client, "limitsvector")
    assert member(limits, "maxtemperature") == "40.00"
    client.close()


def test_options_given_on_the_command_line_win_over_saved_values(started, indi_config):
    write_config(indi_config, new_number("Thermostat", "targetvector", "target", "23"),
                 new_number("Thermostat", "POLLING_PERIOD", "PERIOD_MS", "50"))
    client = started("--target", "18").client()
    client.send(GET_ALL)
    target, period = definitions(client, "targetvector", "POLLING_PERIOD")
    assert (member(target, "target"), member(period, "PERIOD_MS")) == ("18.00", "50")
    client.close()


def test_config_load_applies_the_file_and_default_restores_the_starting_values(started, indi_config):
    client = started(*FAST, "--target", "17").client()
    client.send(GET_ALL)
    write_config(indi_config, new_number("Thermostat", "targetvector", "target", "25"),
                 new_number("Thermostat", "logperiodvector", "logperiod", "60"))
    reply = config_action(client, "CONFIG_LOAD")
    assert reply.get("state") == "Ok" and shown_by_kstars(reply)
    assert member(sent_before(client, reply, "targetvector"), "target") == "25.00"
    assert member(sent_before(client, reply, "logperiodvector"), "logperiod") == "60"

    reply = config_action(client, "CONFIG_DEFAULT")
    assert reply.get("state") == "Ok"
    assert member(sent_before(client, reply, "targetvector"), "target") == "17.00"
    assert member(sent_before(client, reply, "logperiodvector"), "logperiod") == "0.5"
    assert saved(indi_config)[("targetvector", "target")] == "17.00"
    client.close()


def test_config_load_of_a_bad_file_is_an_alert_and_changes_nothing(started, indi_config):
    client = started(*FAST).client()
    client.send(GET_ALL)
    write_config(indi_config, new_number("Thermostat", "targetvector", "target", "25"),
                 new_number("Thermostat", "POLLING_PERIOD", "PERIOD_MS", "1"))
    reply = config_action(client, "CONFIG_LOAD")
    assert reply.get("state") == "Alert" and "PERIOD_MS" in reply.get("message") and shown_by_kstars(reply)
    client.send('<getProperties version="1.7" device="Thermostat" name="targetvector"/>')
    assert member(definitions(client, "targetvector")[0], "target") == "15.00"
    client.close()


def test_config_purge_deletes_the_file(started, indi_config):
    client = started(*FAST).client()
    client.send(GET_ALL)
    assert config_action(client, "CONFIG_SAVE").get("state") == "Ok" and indi_config.exists()
    assert config_action(client, "CONFIG_PURGE").get("state") == "Ok"
    assert not indi_config.exists()
    again = config_action(client, "CONFIG_PURGE")
    assert again.get("state") == "Alert" and again.get("message").startswith("[WARNING] There is no")
    load = config_action(client, "CONFIG_LOAD")         # as libindi: Alert, with news
    assert load.get("state") == "Alert" and load.get("message").startswith("[INFO] No saved configuration")
    client.close()


def test_indiconfig_names_the_file_and_config_and_no_config_choose_otherwise(started, indi_config, tmp_path):
    chosen = tmp_path / "greenhouse.xml"
    for options, path in ((["--config", str(chosen)], chosen), ([], indi_config)):
        server = started(*FAST, *options)
        client = server.client()
        client.send(new_number("Thermostat", "targetvector", "target", "19"))
        wait_until(lambda path=path: saved_target(path) == "19.00", timeout=5.0,
                   what=f"the target saved in {path}")
        client.close()
        server.stop()
        path.unlink()
    client = started(*FAST, "--no-config").client()
    client.send(new_number("Thermostat", "targetvector", "target", "19"))
    client.send(GET_ALL)
    assert config_action(client, "CONFIG_SAVE").get("state") == "Alert"
    assert not indi_config.exists() and not chosen.exists()
    client.close()


def test_without_indiconfig_the_file_is_in_dot_indi_named_for_the_device(monkeypatch, tmp_path):
    monkeypatch.delenv("INDICONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert thermostat.make_driver("Cellar").settings.path == tmp_path / ".indi" / "Cellar_config.xml"


def test_thermostats_in_one_server_keep_their_own_settings(in_process, tmp_path):
    greenhouse = thermostat.make_driver("Greenhouse", poll_interval=0.05, config=tmp_path / "g.xml")
    cellar = thermostat.make_driver("Cellar", poll_interval=0.05, config=tmp_path / "c.xml")
    client = in_process(thermostat.make_server(greenhouse, cellar, port=free_port())).client()
    client.send(GET_ALL)
    client.send(new_number("Greenhouse", "targetvector", "target", "24"))
    client.send(new_number("Cellar", "targetvector", "target", "11"))
    for device in ("Greenhouse", "Cellar"):
        client.send(new_switch(device, "CONFIG_PROCESS", "CONFIG_SAVE", "On"))
        client.expect(tagged("setSwitchVector", device=device, name="CONFIG_PROCESS"))
    assert {e.get("device") for e in ET.parse(tmp_path / "g.xml").getroot()} == {"Greenhouse"}
    assert {e.get("device") for e in ET.parse(tmp_path / "c.xml").getroot()} == {"Cellar"}
    client.close()


def test_a_shared_file_keeps_other_devices_entries(indi_config):
    write_config(indi_config, new_number("Other", "targetvector", "target", "30"))
    driver = thermostat.make_driver()
    driver.settings.save()
    assert [e.get("device") for e in ET.parse(indi_config).getroot()] == ["Other"] + ["Thermostat"] * len(thermostat.SAVED_PROPERTIES)
    asyncio.run(driver.settings.load_at_start(driver.log))
    assert driver.thermostat.target == 15.0


# -- files that cannot be used ----------------------------------------------

HOSTILE = {
    "junk": b"\x00\xff garbage <<<",
    "megabytes of junk": b"<INDIDriver>" + b"x" * (4 << 20),
    "empty": b"",
    "another root": b'<newNumberVector device="Thermostat" name="targetvector"/>',
    "target out of range": new_number("Thermostat", "targetvector", "target", "1000").encode(),
    "target not a number": new_number("Thermostat", "targetvector", "target", "warm").encode(),
    "unknown property": new_number("Thermostat", "heaterpower", "watts", "5000").encode(),
    "unknown member": new_number("Thermostat", "targetvector", "watts", "20").encode(),
    "unsaved property": new_switch("Thermostat", "CONNECTION", "DISCONNECT", "On").encode(),
    "not a request": b'<defNumberVector device="Thermostat" name="targetvector"/>',
    "wrong type": new_switch("Thermostat", "targetvector", "target", "On").encode(),
    "entities": b'<!DOCTYPE x [<!ENTITY a "20">]><INDIDriver/>',
    "one good, one bad": (new_number("Thermostat", "targetvector", "target", "22")
                          + new_number("Thermostat", "POLLING_PERIOD", "PERIOD_MS", "-1")).encode(),
}


@pytest.mark.parametrize("content", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_file_that_cannot_be_used_gives_one_warning_and_the_defaults(content, indi_config, caplog):
    if content.startswith((b"<new", b"<def")):
        content = b"<INDIDriver>" + content + b"</INDIDriver>"
    indi_config.write_bytes(content)
    driver = thermostat.make_driver()
    with caplog.at_level(logging.INFO, logger="thermostat"):
        asyncio.run(driver.settings.load_at_start(driver.log))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(indi_config) in warnings[0].getMessage()
    assert (driver.thermostat.target, driver.poll_interval, driver.templog.log_period) == (15.0, 10.0, 300.0)
    assert not driver.debug_enable and driver.device["CONNECTION"]["CONNECT"] == "On"


@pytest.mark.parametrize("make", [Path.mkdir, os.mkfifo], ids=["a folder", "a FIFO"])
def test_an_unreadable_file_gives_one_warning_and_the_thermostat_serves(started, indi_config, make):
    make(indi_config)                                   # where the file should be
    server = started(*FAST)
    client = server.client()
    client.send(GET_ALL)
    assert member(definitions(client, "targetvector")[0], "target") == "15.00"
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    client.close()
    server.stop()
    warnings = [line for line in server.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and str(indi_config) in warnings[0] and "Traceback" not in server.stderr


# -- DEBUG ------------------------------------------------------------------

def test_debug_turns_this_devices_debug_logging_on_and_off(started, indi_config):
    server = started(*FAST)
    client = server.client()
    client.send(GET_ALL)
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    assert " DEBUG: " not in server.stderr_text()

    client.send(new_switch("Thermostat", "DEBUG", "ENABLE", "On"))
    reply = reply_to(client, "DEBUG")
    assert (reply.get("state"), member(reply, "ENABLE"), member(reply, "DISABLE")) == ("Ok", "On", "Off")
    note = client.expect(tagged("message", device="Thermostat"))
    assert note.get("message") == "[INFO] Debug is enabled." and shown_by_kstars(note)
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    logged = server.stderr_text()
    assert "thermostat.Thermostat DEBUG: temperature" in logged and "TX:: <setNumberVector" in logged

    client.send(new_switch("Thermostat", "DEBUG", "DISABLE", "On"))
    assert member(reply_to(client, "DEBUG"), "ENABLE") == "Off"
    assert "RX:: <newSwitchVector" in server.stderr_text()     # the request, received while debugging
    assert client.expect(tagged("message", device="Thermostat")).get("message") == "[INFO] Debug is disabled."
    quiet_from = len(server.stderr_text())
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    assert " DEBUG: " not in server.stderr_text()[quiet_from:]
    assert saved(indi_config)[("DEBUG", "ENABLE")] == "Off"
    client.send(new_switch("Thermostat", "DEBUG", "ENABLE", "Off"))
    assert reply_to(client, "DEBUG").get("state") == "Alert"
    client.close()


def test_debug_is_saved_and_verbose_turns_it_on(started, indi_config):
    write_config(indi_config, new_switch("Thermostat", "DEBUG", "ENABLE", "On"))
    driver = thermostat.make_driver()
    asyncio.run(driver.settings.load_at_start(driver.log))
    try:
        assert driver.debug_enable and driver.device["DEBUG"]["ENABLE"] == "On"
    finally:
        driver.debug.set(False)     # DEBUG lowers a process-wide logger: leave it as it was found
    client = started(*FAST, "--no-config", "-v").client()
    client.send(GET_ALL)
    assert member(definitions(client, "DEBUG")[0], "ENABLE") == "On"
    client.close()


# -- the command line -------------------------------------------------------

def test_indi_thermostat_help_says_it_speaks_stdio():
    result = subprocess.run(["indi_thermostat", "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "stdin/stdout" in text and "listens on TCP" not in text and "-p 7624" in text


def test_ci_runs_exactly_the_readmes_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(sudo apt-get update [^\n]*)\n```", readme)
    assert len(commands) == 2, "the README's first commands: install and run, then test"
    install, test = commands
    assert install.endswith(".venv/bin/python thermostat.py") and test.endswith("-m pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
