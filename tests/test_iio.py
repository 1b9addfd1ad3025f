"""--sensor iio:DEVICE: a Linux IIO sensor (BME280, HTU21D, DHT22, HDC100x ...),
faked as a directory of files as /sys/bus/iio/devices/iio:deviceN holds them;
with humidity, libindi's WEATHER_PARAMETERS and the local dew point."""

import math
import subprocess
import sys

import pytest

import thermostat
from conftest import FAST, ROOT, free_port, new_switch, tagged, wait_until
from thermostat import IIO_DEVICES, SENSOR_RANGE, IIOSensor, dew_point, find_iio_device


def device(root, index, name=None, **files):
    "A fake /sys/bus/iio/devices/iio:deviceINDEX under root, holding files (name: text)."
    directory = root / f"iio:device{index}"
    directory.mkdir(parents=True)
    if name is not None:
        (directory / "name").write_text(name + "\n")
    for filename, text in files.items():
        write(directory / filename, text)
    return directory


def write(path, text):
    "Replace a file at once, as the kernel presents a whole reading."
    partial = path.with_name(path.name + ".new")
    partial.write_text(f"{text}\n")
    partial.replace(path)


@pytest.fixture
def root(tmp_path):
    return tmp_path / "sys" / "bus" / "iio" / "devices"


def members(element):
    return {one.get("name"): one.text.strip() for one in element}


# -- what a real chip's files look like ------------------------------------


def test_a_bme280_gives_processed_temperature_and_humidity(root):
    device(root, 0, "bme280", in_temp_input=21375, in_humidityrelative_input=48233,
           in_pressure_input="101.325000")
    sensor = IIOSensor("bme280", root=root)
    assert sensor.has_humidity and sensor.valid_range == SENSOR_RANGE
    assert sensor.last_humidity == (None, None)         # nothing read yet
    assert sensor.read() == pytest.approx(21.375)
    assert sensor.last_humidity == (pytest.approx(48.233), None)
    assert sensor.humidity() == pytest.approx(48.233)


def test_a_temperature_only_sensor_has_no_humidity(root):
    device(root, 0, "tmp117", in_temp_input=-1250)
    sensor = IIOSensor("iio:device0", root=root)
    assert not sensor.has_humidity
    assert sensor.read() == pytest.approx(-1.25)
    assert sensor.last_humidity == (None, "the sensor has no humidity")
    with pytest.raises(LookupError, match="no humidity channel"):
        sensor.humidity()


def test_raw_values_are_offset_then_scaled_as_the_iio_abi_says(root):
    device(root, 0, "hdc100x", in_temp_raw=26000, in_temp_scale="2.517700",
           in_temp_offset="-15887.515151",
           in_humidityrelative_raw=30000, in_humidityrelative_scale="1.525878")
    sensor = IIOSensor("hdc100x", root=root)
    assert sensor.read() == pytest.approx((26000 - 15887.515151) * 2.5177 / 1000)
    assert sensor.last_humidity[0] == pytest.approx(30000 * 1.525878 / 1000)


def test_an_offset_is_optional_and_added_before_scaling(root):
    directory = device(root, 0, "x", in_temp_raw=2000, in_temp_scale=10)
    sensor = IIOSensor(str(directory))
    assert sensor.read() == pytest.approx(20.0)
    write(directory / "in_temp_offset", "-500")
    assert sensor.read() == pytest.approx(15.0)


def test_the_processed_file_is_preferred_over_raw(root):
    device(root, 0, "x", in_temp_input=20000, in_temp_raw=1, in_temp_scale=1)
    assert IIOSensor("x", root=root).read() == pytest.approx(20.0)


# -- failing safe: a reading that cannot be trusted raises, saying why -----


@pytest.mark.parametrize("text, problem", [
    ("", "is empty"), ("abc", "not a number"), ("21:30", "not a number"),
    ("nan", "not a number"), ("inf", "not a number"), ("1e3", "not a number"),
    ("21375 21375", "not a number"),
])
def test_a_garbled_temperature_is_refused(root, text, problem):
    directory = device(root, 0, "x", in_temp_input=21375)
    sensor = IIOSensor("x", root=root)
    (directory / "in_temp_input").write_text(text)
    with pytest.raises(ValueError, match=problem):
        sensor.read()


@pytest.mark.parametrize("millidegrees", [-55001, 125001, -273150])
def test_a_temperature_out_of_range_is_refused(root, millidegrees):
    device(root, 0, "x", in_temp_input=millidegrees)
    with pytest.raises(ValueError, match=r"must be from -55000 to 125000 \(millidegrees Celsius\)"):
        IIOSensor("x", root=root).read()


def test_the_range_ends_are_readings(root):
    directory = device(root, 0, "x", in_temp_input=-55000)
    sensor = IIOSensor("x", root=root)
    assert sensor.read() == -55.0
    write(directory / "in_temp_input", 125000)
    assert sensor.read() == 125.0


def test_out_of_range_after_scaling_says_how_it_was_computed(root):
    device(root, 0, "x", in_temp_raw=100, in_temp_scale=2000)      # 200 degrees
    with pytest.raises(ValueError, match=r"\(.*in_temp_raw 100 \+ offset 0\) \* scale 2000"):
        IIOSensor("x", root=root).read()


@pytest.mark.parametrize("scale", ["0", "-1.5"])
def test_a_scale_must_be_positive(root, scale):
    device(root, 0, "x", in_temp_raw=100, in_temp_scale=scale)
    with pytest.raises(ValueError, match="in_temp_scale must be above 0"):
        IIOSensor("x", root=root).read()


def test_raw_without_a_scale_is_refused(root):
    directory = device(root, 0, "x", in_temp_raw=100, in_temp_scale=1)
    sensor = IIOSensor("x", root=root)
    (directory / "in_temp_scale").unlink()
    with pytest.raises(FileNotFoundError, match="in_temp_scale is missing"):
        sensor.read()


def test_a_read_error_says_which_file(root, monkeypatch):
    directory = device(root, 0, "dht11", in_temp_input=20000)
    sensor = IIOSensor("dht11", root=root)
    real = type(directory).read_text

    def fail(path, *args, **kwargs):
        if path.name == "in_temp_input":
            raise OSError(5, "Input/output error")      # what a DHT22 often answers
        return real(path, *args, **kwargs)
    monkeypatch.setattr(type(directory), "read_text", fail)
    with pytest.raises(OSError, match="cannot read .*in_temp_input: Input/output error"):
        sensor.read()


def test_a_device_without_a_temperature_is_refused_at_start(root):
    device(root, 0, "x", in_humidityrelative_input=40000)
    with pytest.raises(LookupError, match="has no temperature channel"):
        IIOSensor("x", root=root)


# -- humidity: never fails the temperature ---------------------------------


@pytest.mark.parametrize("text, problem", [
    ("abc", "not a number"), ("-1", "must be from 0 to 110000"), ("110001", "must be from 0"),
])
def test_a_bad_humidity_leaves_the_temperature_good(root, text, problem):
    device(root, 0, "x", in_temp_input=20000, in_humidityrelative_input=text)
    sensor = IIOSensor("x", root=root)
    assert sensor.read() == pytest.approx(20.0)
    humidity, why = sensor.last_humidity
    assert humidity is None and problem in why


def test_a_saturated_humidity_is_100(root):
    device(root, 0, "htu21", in_temp_input=5000, in_humidityrelative_input=104500)
    sensor = IIOSensor("htu21", root=root)
    sensor.read()
    assert sensor.last_humidity == (100.0, None)


def test_a_failed_temperature_forgets_the_humidity(root):
    directory = device(root, 0, "x", in_temp_input=20000, in_humidityrelative_input=50000)
    sensor = IIOSensor("x", root=root)
    sensor.read()
    assert sensor.last_humidity[0] == pytest.approx(50.0)
    write(directory / "in_temp_input", "junk")
    with pytest.raises(ValueError):
        sensor.read()
    assert sensor.last_humidity == (None, "not read: the temperature could not be")


# -- finding the device ----------------------------------------------------


def test_a_device_is_found_by_directory_by_name_and_by_path(root):
    first = device(root, 0, "bmp280", in_temp_input=1)
    second = device(root, 1, "dht11", in_temp_input=2)
    assert find_iio_device("iio:device1", root) == second
    assert find_iio_device("bmp280", root) == first
    assert find_iio_device(str(second), root) == second


def test_a_failed_lookup_says_what_there_is(root, tmp_path):
    device(root, 0, "bmp280", in_temp_input=1)
    device(root, 1, None, in_temp_input=2)              # no name file: skipped
    with pytest.raises(LookupError, match=r"no IIO device 'sht3x' under .* "
                                          r"\(there: iio:device0 \(bmp280\)\)"):
        find_iio_device("sht3x", root)
    with pytest.raises(LookupError, match="is not a directory"):
        find_iio_device(str(root / "iio:device7"), root)
    with pytest.raises(LookupError, match=r"there: none"):
        find_iio_device("bme280", tmp_path / "nothing")
    assert str(IIO_DEVICES) == "/sys/bus/iio/devices"


def test_two_devices_of_one_name_must_be_told_apart(root):
    device(root, 0, "dht11", in_temp_input=1)
    device(root, 3, "dht11", in_temp_input=2)
    with pytest.raises(LookupError, match="2 IIO devices are named 'dht11': iio:device0, iio:device3"):
        IIOSensor("dht11", root=root)
    assert IIOSensor("iio:device3", root=root).read() == 0.002


def remove(directory):
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def test_a_device_found_by_name_is_found_again_after_renumbering(root):
    device(root, 0, "bme280", in_temp_input=20000, in_humidityrelative_input=40000)
    sensor = IIOSensor("bme280", root=root)
    assert sensor.read() == 20.0
    remove(root / "iio:device0")
    with pytest.raises(FileNotFoundError, match="is gone: no IIO device 'bme280'"):
        sensor.read()
    device(root, 2, "bme280", in_temp_input=21000, in_humidityrelative_input=41000)
    assert sensor.read() == 21.0 and sensor.last_humidity == (41.0, None)


def test_a_device_named_by_directory_is_not_looked_for_elsewhere(root):
    device(root, 0, "bme280", in_temp_input=20000)
    sensor = IIOSensor("iio:device0", root=root)
    remove(root / "iio:device0")
    device(root, 1, "bme280", in_temp_input=21000)
    with pytest.raises(FileNotFoundError, match="iio:device0 is gone"):
        sensor.read()


# -- dew point -------------------------------------------------------------


@pytest.mark.parametrize("t, rh, expected", [
    (20.0, 100.0, 20.0),                # saturated air: the dew point is the temperature
    (20.0, 50.0, 9.26), (25.0, 60.0, 16.69), (0.0, 80.0, -3.0), (-10.0, 90.0, -11.3),
])
def test_the_dew_point_is_magnus(t, rh, expected):
    assert dew_point(t, rh) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("t, rh", [(20, 0), (20, -5), (20, math.nan),
                                   (-243.12, 50), (math.inf, 50), (math.nan, 50)])
def test_there_is_no_dew_point_for_impossible_air(t, rh):
    with pytest.raises(ValueError, match="no dew point"):
        dew_point(t, rh)


# -- through make_driver: WEATHER_PARAMETERS and the dew-point source -------


def served_driver(in_process, sensor):
    driver = thermostat.make_driver(poll_interval=0.05, config=None, sensor=sensor,
                                    hardware_timeout=0.5)
    client = in_process(thermostat.make_server(driver, port=free_port())).client()
    client.send('<getProperties version="1.7"/>')
    return driver, client


def weather(state=None, message=None):
    def match(element):
        return (element.tag == "setNumberVector" and element.get("name") == "WEATHER_PARAMETERS"
                and (state is None or element.get("state") == state)
                and (message is None or message in (element.get("message") or "")))
    return match


def test_with_humidity_the_driver_publishes_libindis_weather_numbers(root, in_process):
    directory = device(root, 0, "bme280", in_temp_input=20000, in_humidityrelative_input=50000)
    driver, client = served_driver(in_process, IIOSensor("bme280", root=root))
    defined = client.expect(tagged("defNumberVector", name="WEATHER_PARAMETERS"))
    assert (defined.get("perm"), defined.get("group")) == ("ro", "Environment")
    assert [(m.get("name"), m.get("label")) for m in defined] == [
        ("WEATHER_HUMIDITY", "Humidity %"), ("WEATHER_DEWPOINT", "Dew Point (C)")]
    first = client.expect(weather("Ok"))
    assert members(first) == {"WEATHER_HUMIDITY": "50.00", "WEATHER_DEWPOINT": "9.26"}
    write(directory / "in_humidityrelative_input", 80000)
    write(directory / "in_temp_input", 10000)
    later = client.expect(lambda e: weather("Ok")(e) and members(e)["WEATHER_HUMIDITY"] == "80.00")
    assert members(later)["WEATHER_DEWPOINT"] == f"{dew_point(10.0, 80.0):.2f}" == "6.71"
    assert later.get("timestamp") > first.get("timestamp")


def test_the_local_dew_point_is_a_source_that_says_when_it_was_read(root, in_process):
    directory = device(root, 0, "bme280", in_temp_input=20000, in_humidityrelative_input=50000)
    driver, client = served_driver(in_process, IIOSensor("bme280", root=root))
    wait_until(lambda: driver.dew_point is not None, what="a dew point")
    good = driver.dew_point
    assert (good.celsius, good.humidity) == (pytest.approx(9.26, abs=0.01), 50.0)
    assert good.timestamp.tzinfo is not None
    wait_until(lambda: driver.dew_point.timestamp > good.timestamp, what="the next poll's")
    # no good humidity: WEATHER_PARAMETERS Alert, said once; the dew point stays, aging
    write(directory / "in_humidityrelative_input", "garbage")
    alert = client.expect(weather("Alert", "[WARNING] humidity: "))
    assert "not a number" in alert.get("message")
    stale = driver.dew_point
    client.expect(weather("Alert"))
    again = client.expect(weather("Alert"))
    assert not again.get("message") and driver.dew_point == stale
    assert members(again) == {"WEATHER_HUMIDITY": "50.00", "WEATHER_DEWPOINT": "9.26"}
    write(directory / "in_humidityrelative_input", 60000)
    client.expect(weather("Ok", "the humidity reads again"))
    assert driver.dew_point.timestamp > stale.timestamp and driver.dew_point.humidity == 60.0


def test_a_failed_sensor_is_told_once_as_the_temperatures(root, in_process):
    directory = device(root, 0, "bme280", in_temp_input=20000, in_humidityrelative_input=50000)
    driver, client = served_driver(in_process, IIOSensor("bme280", root=root))
    client.expect(weather("Ok"))
    write(directory / "in_temp_input", "junk")
    client.expect(lambda e: e.get("name") == "temperaturevector" and "[ERROR] sensor" in
                  (e.get("message") or ""))
    quiet = client.expect(weather("Alert"))
    assert not quiet.get("message")


def test_disconnected_the_weather_numbers_are_idle(root, in_process):
    device(root, 0, "bme280", in_temp_input=20000, in_humidityrelative_input=50000)
    driver, client = served_driver(in_process, IIOSensor("bme280", root=root))
    client.expect(weather("Ok"))
    client.send(new_switch("Thermostat", "CONNECTION", "DISCONNECT", "On"))
    client.expect(weather("Idle"))


def test_without_humidity_there_are_no_weather_numbers(root, in_process):
    device(root, 0, "tmp117", in_temp_input=20000)
    driver, client = served_driver(in_process, IIOSensor("tmp117", root=root))
    client.expect(lambda e: e.get("name") == "temperaturevector" and e.tag.startswith("set")
                  and members(e)["temperature"] == "20.00")
    client.send('<getProperties version="1.7"/>')
    client.expect(tagged("defSwitchVector", name="CONFIG_PROCESS"))    # the last definition
    assert not [e for e in client.received if e.get("name") == "WEATHER_PARAMETERS"]
    assert driver.weather is None and driver.dew_point is None


# -- through the command line ----------------------------------------------


def run(*options):
    return subprocess.run([sys.executable, str(ROOT / "thermostat.py"), *options],
                          capture_output=True, text=True, timeout=20)


def test_the_command_line_serves_an_iio_sensor_with_humidity(root, served):
    directory = device(root, 0, "htu21", in_temp_input=21500, in_humidityrelative_input=40000)
    client = served("--sensor", f"iio:{directory}").client()
    client.send('<getProperties version="1.7"/>')
    client.expect(lambda e: e.get("name") == "temperaturevector" and e.tag.startswith("set")
                  and members(e)["temperature"] == "21.50")
    assert members(client.expect(weather("Ok"))) == {"WEATHER_HUMIDITY": "40.00",
                                                     "WEATHER_DEWPOINT": "7.32"}


def test_the_command_line_serves_an_iio_sensor_without_humidity(root, served):
    directory = device(root, 0, "tmp117", in_temp_raw=2000, in_temp_scale="7.8125")
    client = served("--sensor", f"iio:{directory}").client()
    client.send('<getProperties version="1.7"/>')
    client.expect(lambda e: e.get("name") == "temperaturevector" and e.tag.startswith("set")
                  and members(e)["temperature"] == "15.62")
    client.send('<getProperties version="1.7"/>')
    client.expect(tagged("defSwitchVector", name="CONFIG_PROCESS"))
    assert not [e for e in client.received if e.get("name") == "WEATHER_PARAMETERS"]


@pytest.mark.parametrize("spec, words", [
    ("iio:", "'iio:' is not simulator[:TAU], w1:DIR, iio:DEVICE or command:CMD"),
    ("iio:/nowhere/iio:device0", "argument --sensor: /nowhere/iio:device0 is not a directory"),
])
def test_a_bad_iio_sensor_is_one_clear_line(spec, words):
    result = run("--sensor", spec, *FAST)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr


def test_an_iio_device_without_a_temperature_is_one_clear_line(root):
    directory = device(root, 0, "x", in_humidityrelative_input=40000)
    result = run("--sensor", f"iio:{directory}")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"thermostat.py: error: argument --sensor: {directory} has no temperature channel "
        "(in_temp_input, or in_temp_raw and in_temp_scale) (see --help)"]


def test_help_names_the_iio_sensor():
    text = " ".join(run("--help").stdout.split())
    assert "iio:DEVICE, a Linux IIO sensor" in text and "gives the dew point" in text
