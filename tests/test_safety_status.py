"""SAFETY_STATUS as libindi's Safety Monitor and Ekos's Scheduler read it.

libindi's indi_safetymonitor (drivers/auxiliary/safetymonitor_client.cpp)
takes from each device it watches, named exactly, only its SAFETY_STATUS
vector's *state*, and only once SAFETY_STATUS was defined as a light vector
(a definition of another type is ignored: the device stays Idle, "no
status"). Its worst case is the largest of Idle 0 < Ok 1 < Busy 2 < Alert 3.
It never re-reads the property, and a delProperty of SAFETY_STATUS alone
leaves its last state standing. libindi's weather interface and UPS driver
carry the same state in one light, SAFETY: ours has it first, then a light
each for the sensor, the heater, the limits, whether the heater heats and the
weather data."""

import thermostat
from conftest import new_number, new_switch

ORDER = {"Idle": 0, "Ok": 1, "Busy": 2, "Alert": 3}  # libindi's IPState values
LIGHTS = ["SAFETY", "SENSOR", "HEATER", "LIMITS", "EFFECTIVE", "WEATHER"]


def lights(element):
    return {one.get("name"): one.text.strip() for one in element}


def watched(served, *options, device="Thermostat"):
    client = served(*options).client()
    client.send('<getProperties version="1.7"/>')
    return client


def safety_state(client, state, device="Thermostat"):
    "Wait for a SAFETY_STATUS defined or set in state; return it."
    return client.expect(lambda e: e.tag in ("defLightVector", "setLightVector")
                         and e.get("name") == "SAFETY_STATUS"
                         and e.get("device") == device and e.get("state") == state,
                         what=f"SAFETY_STATUS {state}")


def check_shape(client, device="Thermostat"):
    """What the monitor needs, in all that was received: one definition, a
    light vector, before any set; every element with a valid state; that
    state the SAFETY light, and the worst of the others; never deleted.
    Returns the SAFETY_STATUS elements."""
    received = client.received
    safety = [e for e in received if e.get("name") == "SAFETY_STATUS" and e.get("device") == device]
    assert safety, "no SAFETY_STATUS"
    assert [e.tag for e in safety if e.tag.startswith("def")] == ["defLightVector"]
    assert safety[0].tag == "defLightVector", "defined before it is set"
    for element in safety:
        assert element.tag in ("defLightVector", "setLightVector"), element.tag
        state, shown = element.get("state"), lights(element)
        assert state in ORDER, f"{element.tag} without a valid state: {state!r}"
        assert list(shown) == LIGHTS and set(shown.values()) <= set(ORDER)
        assert shown["SAFETY"] == state
        assert ORDER[state] == max(ORDER[shown[name]] for name in LIGHTS[1:]), (state, shown)
    assert not [e for e in received if e.tag == "delProperty" and e.get("device") == device]
    return safety


def test_the_safety_light_comes_first_and_its_labels_are_libindis():
    vector = next(v for v in thermostat.thermostat_properties(thermostat.ThermalControl(), 300.0)
                  if v.name == "SAFETY_STATUS")
    assert [(m.name, m.label) for m in vector.data.values()] == [
        ("SAFETY", "Safety"), ("SENSOR", "Sensor"), ("HEATER", "Heater"), ("LIMITS", "Limits"),
        ("EFFECTIVE", "Heater heats"), ("WEATHER", "Weather data")]


def test_the_safety_light_is_the_worst_of_the_others():
    assert thermostat.Safety().lights() == dict(SAFETY="Ok", SENSOR="Ok", HEATER="Ok", LIMITS="Ok",
                                                EFFECTIVE="Ok", WEATHER="Ok")
    busy = thermostat.Safety(limit="above the maximum")
    assert list(busy.lights().items()) == [("SAFETY", "Busy"), ("SENSOR", "Ok"),
                                           ("HEATER", "Ok"), ("LIMITS", "Busy"),
                                           ("EFFECTIVE", "Ok"), ("WEATHER", "Ok")]
    assert thermostat.Safety(sensor="gone", limit="above").lights()["SAFETY"] == "Alert"
    assert thermostat.Safety(heater="jammed").lights()["SAFETY"] == "Alert"
    assert thermostat.Safety(limit="on too long", alarm=True).lights()["SAFETY"] == "Alert"


def test_good_readings_are_ok_for_the_safety_monitor(served):
    client = watched(served)
    defined = client.expect(lambda e: e.tag == "defLightVector" and e.get("name") == "SAFETY_STATUS")
    assert defined.get("state") == "Idle" and set(lights(defined).values()) == {"Idle"}
    safety_state(client, "Ok")
    check_shape(client)


def test_a_failing_sensor_is_alert_for_the_safety_monitor(served):
    client = watched(served, "--sensor", "command:false")
    alert = safety_state(client, "Alert")
    assert lights(alert) == dict(SAFETY="Alert", SENSOR="Alert", HEATER="Ok", LIMITS="Ok",
                                 EFFECTIVE="Ok", WEATHER="Ok")
    check_shape(client)


def test_above_the_maximum_temperature_is_a_warning_busy(served):
    # the simulator reads about 20; a client lowers the limit below it, then gives it back (the
    # command line's maximum is a ceiling clients may not raise, so it is not the one lowered)
    client = watched(served)
    safety_state(client, "Ok")
    client.send(new_number("Thermostat", thermostat.SAFETY_LIMITS, "maxtemperature", "10"))
    busy = safety_state(client, "Busy")
    assert lights(busy) == dict(SAFETY="Busy", SENSOR="Ok", HEATER="Ok", LIMITS="Busy",
                                EFFECTIVE="Ok", WEATHER="Ok")
    client.send(new_number("Thermostat", thermostat.SAFETY_LIMITS, "maxtemperature", "50"))
    safety_state(client, "Ok")
    check_shape(client)


def test_the_device_name_is_the_one_the_monitor_is_given(served):
    # the monitor matches the name exactly: DEVICES "Greenhouse Heater@host:port"
    client = watched(served, "--device", "Greenhouse Heater")
    safety_state(client, "Ok", device="Greenhouse Heater")
    check_shape(client, device="Greenhouse Heater")
    assert not [e for e in client.received if e.get("device") == "Thermostat"]


def test_disconnected_with_the_heater_off_is_idle_no_status_not_unsafe(served):
    """The monitor ranks Idle below Ok: a disconnected thermostat, its
    heater known off, neither trips nor clears the worst case."""
    client = watched(served)
    safety_state(client, "Ok")
    client.send(new_switch("Thermostat", "CONNECTION", "DISCONNECT", "On"))
    idle = safety_state(client, "Idle")
    assert set(lights(idle).values()) == {"Idle"}
    client.send(new_switch("Thermostat", "CONNECTION", "CONNECT", "On"))
    safety_state(client, "Ok")
    check_shape(client)


def test_disconnected_with_the_heater_maybe_on_is_alert(served):
    client = watched(served, "--heater", "command:false")       # every switch fails
    safety_state(client, "Alert")
    client.send(new_switch("Thermostat", "CONNECTION", "DISCONNECT", "On"))
    alert = client.expect(lambda e: e.tag == "setLightVector" and e.get("name") == "SAFETY_STATUS"
                          and lights(e)["SENSOR"] == "Idle", what="SAFETY_STATUS disconnected")
    assert alert.get("state") == "Alert"
    assert lights(alert) == dict(SAFETY="Alert", SENSOR="Idle", HEATER="Alert", LIMITS="Idle",
                                 EFFECTIVE="Idle", WEATHER="Idle")
    check_shape(client)

