"""The PWM heater (pwm:CHIP:CHANNEL) on a fake /sys/class/pwm: a proportional heater."""

import pytest

import thermostat


@pytest.fixture
def pwm(tmp_path):
    channel = tmp_path / "pwmchip0" / "pwm1"
    channel.mkdir(parents=True)
    (channel / "period").write_text("1000000\n")
    (channel / "duty_cycle").write_text("0\n")
    (channel / "enable").write_text("0\n")
    return tmp_path, channel


def test_a_pwm_heater_takes_a_power_as_that_fraction_of_its_period(pwm):
    root, channel = pwm
    heater = thermostat.PwmHeater("0", "1", root=root)
    assert thermostat.is_proportional(heater)
    heater.set_power(0.375)
    assert (channel / "duty_cycle").read_text() == "375000"
    assert (channel / "enable").read_text() == "1"
    heater.set_power(1.5)  # never beyond the whole period
    assert (channel / "duty_cycle").read_text() == "1000000"
    heater.set_power(0.0)
    assert (channel / "duty_cycle").read_text() == "0"


def test_a_pwm_output_that_is_not_exported_is_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="export it first"):
        thermostat.PwmHeater("0", "1", root=tmp_path)


def test_a_pwm_heater_is_given_0_when_the_driver_stands_by(pwm):
    root, channel = pwm
    heater = thermostat.PwmHeater("0", "1", root=root)
    model = thermostat.ThermalControl(temperature=10.0, target=15.0, proportional=True)
    hardware = thermostat.Hardware(thermostat.Simulator(), heater)
    hardware.switch_now(model, 1.0)
    assert (channel / "duty_cycle").read_text() == "1000000"
    model.stand_by()
    hardware.switch_now(model, model.heater_command())
    assert (channel / "duty_cycle").read_text() == "0" and model.heater_power == 0
