"""The adaptations to indipydriver 3.1.2 and indipyserver 0.0.6: each test
fails when its adaptation is taken out of thermostat.py."""

import asyncio
import subprocess
import time

import pytest
from indipydriver import IPyDriver
from indipyserver import IPyServer

import thermostat
from conftest import (
    ServerProcess,
    cpu_seconds,
    exdriver_client,
    free_port,
    new_number,
    new_switch,
    tagged,
)


def test_server_stays_idle_after_clients_disconnect():
    """indipyserver 0.0.6 spins at 100% CPU after a client closes its connection
    cleanly; IndiServer must not. A clean close needs a client that has read
    everything (unread data makes the kernel reset the connection instead)."""
    server = ServerProcess()             # default 10 s poll: an idle server
    try:
        for _ in range(10):
            client = server.client()
            client.send('<getProperties version="1.7" device="Thermostat" name="targetvector"/>')
            client.expect(tagged("defNumberVector", name="targetvector"))
            client.close()
        time.sleep(0.2)
        before = cpu_seconds(server.process.pid)
        time.sleep(2)                   # the window measured: spinning, the server takes all of it
        used = cpu_seconds(server.process.pid) - before
        assert used < 0.1, f"server used {used:.2f} s of CPU in 2 s while idle"
    finally:
        assert server.stop() == 0


def test_an_idle_server_sets_no_timers_of_its_own():
    """indipyserver 0.0.6 wakes every 0.5 s to check its keepalive timer, and
    indipydriver 3.1.2 every second to check snooping that this driver never
    does: most of an idle server's CPU. Idle here, at a 10 s poll, the event
    loop should have nothing to time but the next poll and the keepalive."""
    async def count_timers():
        server = thermostat.make_server(thermostat.make_driver(), port=free_port())
        running = asyncio.create_task(server.asyncrun())
        await asyncio.sleep(0.5)                    # started
        loop, timers = asyncio.get_running_loop(), []
        original = loop.call_at
        loop.call_at = lambda when, callback, *args, **kwargs: (timers.append(callback),
                                                                original(when, callback, *args, **kwargs))[1]
        await asyncio.sleep(3)
        loop.call_at = original
        server.shutdown()
        await asyncio.wait_for(running, 2)
        return timers[1:]                           # the first is this test's own sleep
    timers = asyncio.run(count_timers())
    assert len(timers) <= 1, f"{len(timers)} timers set in 3 s of idling: {timers}"


def test_the_keepalive_still_goes_out_when_nothing_else_does(in_process):
    server = thermostat.make_server(thermostat.make_driver(), port=free_port())
    server.keepalive = 0.3
    client = in_process(server).client()
    client.expect(lambda e: e.tag == "message" and e.get("message") == "Keep alive message", timeout=3)
    client.close()


def test_clients_that_reset_their_connection_leave_no_traceback():
    "indipyserver 0.0.6 prints an unhandled ConnectionResetError for every client that resets."
    server = ServerProcess()
    try:
        for _ in range(3):
            subprocess.run(["indi_getprop", "-p", str(server.port), "-t", "1", "Thermostat.targetvector.target"],
                           capture_output=True, timeout=10, check=True)
            client = server.client()
            client.send('<getProperties version="1.7"/>')
            client.expect(tagged("defNumberVector"))
            client.close()                # with definitions unread: a reset
        time.sleep(0.3)
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.stderr and "Unhandled" not in server.stderr


class Recorder:
    "Stands in for the driver's link to a server: records what the driver sends."

    def __init__(self, driver):
        self.sent = []
        driver._commsobj = self

    async def run_tx(self, xmldata):
        self.sent.append(xmldata)


def test_every_blob_carries_its_own_size():
    driver = thermostat.make_driver()
    recorder = Recorder(driver)
    contents = [b"timestamp,temperature\n" + b"x" * n for n in (100, 10, 1000)]

    async def send_all():
        for content in contents:
            await thermostat.send_blob(driver.device["logsvector"], "templogs", content)
    asyncio.run(send_all())
    sizes = [int(xml.find("oneBLOB").get("size")) for xml in recorder.sent]
    assert sizes == [len(c) for c in contents]


def test_a_message_is_sent_once_not_with_every_later_update():
    driver = thermostat.make_driver()
    recorder = Recorder(driver)
    vector = driver.device["targetvector"]

    async def exchange():
        await driver.reject(vector, "target must be a number from -50 to 99; received 'x'")
        await vector.send_setVector(message="", state="Ok")
        await vector.send_defVector()
    asyncio.run(exchange())
    assert [xml.get("message") for xml in recorder.sent] == [
        "[WARNING] target must be a number from -50 to 99; received 'x'", None, None]


def test_a_request_of_the_wrong_type_is_answered_not_fatal():
    driver = thermostat.make_driver()
    recorder = Recorder(driver)
    import xml.etree.ElementTree as ET
    request = ET.fromstring(new_switch("Thermostat", "targetvector", "target", "On"))
    asyncio.run(thermostat.hand_to_driver(driver, request))
    (reply,) = recorder.sent
    assert reply.get("state") == "Alert" and "does not apply" in reply.get("message")


def test_an_exception_in_a_handler_is_answered_and_the_server_keeps_serving(in_process, monkeypatch):
    def broken(self, now):
        raise RuntimeError("sensor unplugged")
    monkeypatch.setattr(thermostat.TemperatureLog, "start", broken)
    driver = thermostat.make_driver(poll_interval=0.05)
    running = in_process(thermostat.make_server(driver, port=free_port()))
    client = running.client()
    client.send('<getProperties version="1.7"/>')
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "On"))
    reply = client.expect(tagged("setSwitchVector", name="switchvector"))
    assert reply.get("state") == "Alert" and "internal error" in reply.get("message")
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    assert running.thread.is_alive()
    client.close()


class FailingDriver(IPyDriver):
    async def hardware(self):
        await asyncio.sleep(0.1)
        raise RuntimeError("another driver's bug")


def test_an_exception_in_any_driver_is_a_recorded_failure_not_a_silent_exit():
    server = thermostat.make_server(thermostat.make_driver(), FailingDriver(), port=free_port())
    asyncio.run(asyncio.wait_for(server.asyncrun(), 10))
    assert "another driver's bug" in server.failure


def test_a_port_in_use_is_a_recorded_failure():
    port = free_port()
    first = thermostat.make_server(thermostat.make_driver("One"), port=port)
    second = thermostat.make_server(thermostat.make_driver("Two"), port=port)

    async def both():
        running = asyncio.create_task(first.asyncrun())
        await asyncio.sleep(0.3)
        await asyncio.wait_for(second.asyncrun(), 10)
        first.shutdown()
        await asyncio.wait_for(running, 5)
    asyncio.run(both())
    assert first.failure is None
    assert second.failure.startswith(f"cannot listen on localhost:{port}")


def test_start_up_fails_loudly_when_an_internal_is_missing(monkeypatch):
    monkeypatch.delattr(IPyServer, "add_exdriver")
    with pytest.raises(RuntimeError, match="IPyServer.add_exdriver"):
        thermostat.make_server(port=free_port())


# _IndiStream: indipyserver 0.0.6 drops a whole connection on one malformed
# element and lets an element never closed swallow everything after it.

def parse(*chunks, **kwargs):
    stream = thermostat._IndiStream(**kwargs)
    return [(e.tag, e.get("name")) for chunk in chunks for e in stream.feed(chunk)]


GET = b'<getProperties version="1.7" name="%s"/>'


def test_stream_splits_elements_across_arbitrary_chunks():
    data = GET % b"a" + b'<newNumberVector device="T" name="b"><oneNumber name="x">1</oneNumber></newNumberVector>'
    whole = parse(data)
    assert whole == [("getProperties", "a"), ("newNumberVector", "b")]
    assert parse(*(data[i:i + 1] for i in range(len(data)))) == whole


@pytest.mark.parametrize("bad", [b'<oneNumber name="x">1</oops>', b"\x00\xff garbage <<>>", b'<a b="c"d="e"/>',
                                 b'<!DOCTYPE x [<!ENTITY e "e">]><message message="&e;"/>',
                                 b"</indi>"])      # the end of the synthetic root the stream parses in
def test_stream_resumes_after_malformed_xml(bad):
    assert parse(GET % b"before", bad, GET % b"after") == [("getProperties", "before"), ("getProperties", "after")]
    assert parse(GET % b"before" + bad + GET % b"after")[-1] == ("getProperties", "after")


def test_stream_resumes_after_an_error_on_a_later_line():
    assert parse(b"\n\n" + GET % b"a" + b"\n  </oops>\n" + GET % b"b") == [("getProperties", "a"), ("getProperties", "b")]


def test_an_element_never_closed_does_not_swallow_the_next_ones():
    assert parse(b'<newNumberVector device="T" name="open"><oneNumber name="x">1</oneNumber>',
                 GET % b"a", GET % b"b") == [("getProperties", "a"), ("getProperties", "b")]


def test_an_element_beyond_the_bound_is_discarded_and_parsing_goes_on():
    stream = thermostat._IndiStream(max_bytes=1000)
    assert stream.feed(b'<newBLOBVector device="T" name="big"><oneBLOB name="b">' + b"A" * 2000) == []
    assert stream._held == 0
    assert [e.get("name") for e in stream.feed(GET % b"after")] == ["after"]


def test_a_libindi_camera_under_add_exdriver_sends_every_image(in_process):
    "libindi's drivers wait for the server's answer to a ping after each BLOB before the next one."
    client = exdriver_client(in_process, "indi_simulator_ccd")
    device = "CCD Simulator"
    deadline = time.monotonic() + 10
    while not any(e.get("name") == "CONNECTION" for e in client.received):
        assert time.monotonic() < deadline, "the camera was never defined"
        client.send(f'<getProperties version="1.7" device="{device}"/>')
        client._read_some(time.monotonic() + 0.5)
    client.send(f'<enableBLOB device="{device}">Also</enableBLOB>')
    client.send(f'<newSwitchVector device="{device}" name="CONNECTION"><oneSwitch name="CONNECT">On</oneSwitch>'
                '</newSwitchVector>')
    client.expect(tagged("defNumberVector", device, "CCD_EXPOSURE"), timeout=10)
    for _ in range(2):
        client.send(new_number(device, "CCD_EXPOSURE", "CCD_EXPOSURE_VALUE", "0.01"))
        image = client.expect(tagged("setBLOBVector", device, "CCD1"), timeout=10)
        assert len(image.find("oneBLOB").text or "") > 1000000
    client.close()
