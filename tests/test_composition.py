"""An integrator's server: two thermostats and a driver that snoops on one, in one IPyServer."""

import threading

from indipydriver import IPyDriver, setNumberVector

import thermostat
from conftest import free_port, new_number, tagged


class Snooper(IPyDriver):
    "Snoops Alpha's temperature, as a controller beside the thermostat would."

    def __init__(self):
        super().__init__()
        self.temperatures = []
        self.heard = threading.Event()

    async def hardware(self):
        await self.send_getProperties("Alpha", "temperaturevector")

    async def snoopevent(self, event):
        if isinstance(event, setNumberVector) and event.vectorname == "temperaturevector":
            self.temperatures.append((event.devicename, event["temperature"]))
            if len(self.temperatures) >= 3:
                self.heard.set()


def test_two_thermostats_and_a_snooper_share_one_server(in_process):
    alpha = thermostat.make_driver("Alpha", poll_interval=0.05)
    beta = thermostat.make_driver("Beta", poll_interval=0.05, target=30)
    snooper = Snooper()
    running = in_process(thermostat.make_server(alpha, beta, snooper, port=free_port()))

    assert snooper.heard.wait(10)
    assert {device for device, _ in snooper.temperatures} == {"Alpha"}

    client = running.client()
    client.send('<getProperties version="1.7"/>')
    defs = []
    try:        # every definition, until the server is quiet for a second
        while True:
            defs.append(client.expect(lambda e: e.tag.startswith("def"), timeout=1))
    except AssertionError:
        pass
    assert sorted({e.get("device") for e in defs}) == ["Alpha", "Beta"]
    devices = [e.get("device") for e in defs]
    assert devices.count("Alpha") == devices.count("Beta") > 10
    client.send(new_number("Beta", "targetvector", "target", "25"))
    reply = client.expect(tagged("setNumberVector", device="Beta", name="targetvector"))
    assert reply.find("oneNumber").text == "25.00"
    assert (alpha.thermostat.target, beta.thermostat.target) == (15.0, 25.0)
    client.close()
    assert running.stop()
