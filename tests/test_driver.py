"""ThermoDriver with a stand-in for the server: what it sends when the link is slow."""

import asyncio
import base64

import thermostat


class SlowLink:
    "Records what the driver sends, taking `delay` seconds per message like a stalled client."

    def __init__(self, driver, delay):
        self.delay = delay
        self.sent = []
        driver._commsobj = self             # the driver's link to a server

    def shutdown(self):
        pass

    async def run_tx(self, xmldata):
        await asyncio.sleep(self.delay)
        self.sent.append(xmldata)


def test_a_slow_link_drops_live_readings_but_no_log_rows():
    driver = thermostat.make_driver(poll_interval=0.01, log_period=0.1)
    link = SlowLink(driver, delay=0.03)
    logged = []
    step = driver.thermostat.step

    def recording_step(now, measured, *clock):
        reading = step(now, measured, *clock)
        if driver.templog.logging:
            logged.append(f"{thermostat.indi_timestamp(reading.timestamp)},{reading.temperature:.2f}")
        return reading
    driver.thermostat.step = recording_step

    async def run():
        driver.templog.start(thermostat.datetime.now(thermostat.timezone.utc))
        hardware = asyncio.create_task(driver.hardware())
        await asyncio.sleep(1.5)
        driver.shutdown()
        await asyncio.wait_for(hardware, 5)
    asyncio.run(run())

    assert driver.dropped_readings > 10, "the link was slow enough to overflow the queue"
    assert len(logged) > 100, "the thermostat kept its pace regardless"
    sent_rows = [row for xml in link.sent if xml.tag == "setBLOBVector"
                 for row in base64.b64decode(xml.find("oneBLOB").text).decode().splitlines()[1:]]
    unsent_rows = [row for logfile in driver.templog.backlog for row in logfile.rows]
    assert sent_rows + [row.strip() for row in unsent_rows] == logged
    assert len(sent_rows) > 0


def test_refusals_beyond_the_limit_are_counted_in_the_next_one_sent():
    driver = thermostat.make_driver()
    link = SlowLink(driver, delay=0)
    driver.answers.refusals = thermostat.Throttle(limit=2, period=0.2)
    request = thermostat.ET.fromstring('<newNumberVector device="Thermostat" name="nosuch">'
                                       '<oneNumber name="x">1</oneNumber></newNumberVector>')

    async def run():
        for _ in range(5):
            await thermostat.hand_to_driver(driver, request)
        await asyncio.sleep(0.25)
        await thermostat.hand_to_driver(driver, request)
    asyncio.run(run())

    messages = [xml.get("message") for xml in link.sent if xml.tag == "message"]
    assert len(messages) == 3
    assert "3 more refusals were not sent" in messages[2] and "more refusals" not in messages[1]


def test_a_failed_config_load_leaves_a_latched_heater_alarm_latched(tmp_path):
    config = tmp_path / "bad.xml"
    config.write_text('<INDIDriver><newNumberVector device="Thermostat" name="targetvector">'
                      '<oneNumber name="target">500</oneNumber></newNumberVector></INDIDriver>')
    driver = thermostat.make_driver(config=config)
    SlowLink(driver, delay=0)
    driver.thermostat.on_time_alarm = True          # latched: only a person's new target clears it
    load = thermostat.ET.fromstring('<newSwitchVector device="Thermostat" name="CONFIG_PROCESS">'
                                    '<oneSwitch name="CONFIG_LOAD">On</oneSwitch></newSwitchVector>')
    asyncio.run(thermostat.hand_to_driver(driver, load))
    assert driver.device["CONFIG_PROCESS"].state == "Alert"
    assert driver.thermostat.on_time_alarm


def test_config_default_restores_values_make_driver_was_given_beyond_the_usual_ranges(tmp_path):
    driver = thermostat.make_driver(poll_interval=0.001, log_period=0.05, max_heater_on=0.5,
                                    config=tmp_path / "fast.xml")
    SlowLink(driver, delay=0)
    default = thermostat.ET.fromstring('<newSwitchVector device="Thermostat" name="CONFIG_PROCESS">'
                                       '<oneSwitch name="CONFIG_DEFAULT">On</oneSwitch></newSwitchVector>')
    asyncio.run(thermostat.hand_to_driver(driver, default))
    assert driver.device["CONFIG_PROCESS"].state == "Ok"
    assert (driver.poll_interval, driver.templog.log_period, driver.thermostat.max_heater_on) == (0.001, 0.05, 0.5)
